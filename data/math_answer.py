"""Final answers of MATH problems: find the boxed answer, normalise it, compare two answers.

Paper section 4 scores MATH by "boxed answer equivalence". We follow the standard checker
of the MATH paper (Hendrycks et al. 2021, `is_equiv`, as used by most evaluation suites):
strip formatting that does not change the value (spaces, \\left/\\right, \\dfrac/\\tfrac,
degrees, dollars, percent, trailing units in \\text{}), bring shorthand TeX to one form
(\\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}, 3/4 -> \\frac{3}{4}), then compare strings.
We add only rewrites that cannot merge two different values: thousands separators in an
integer (10,000 -> 10000) and equality by value of a plain decimal and a decimal or an integer
fraction (2.50 == 2.5, 18.0 == 18, 0.50 == 1/2). (The standard checker rewrites the string "0.5" to
\\frac{1}{2} before anything else, so 0.50 and 0.5 came out different; we compare values instead.)
No symbolic algebra: \\frac{2}{4} and \\frac{1}{2} stay different, as in the standard checker.
"""
import re
from fractions import Fraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if absent.
    Also accepts the brace-less form `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\boxed 5$": the argument is the next token
        token = re.match(r"\s*([^\s$]+)", rest)
        return token.group(1) if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the response was cut off inside the box


# ----------------------------------------------------------------------------- shorthand TeX

def fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b} (arguments given without braces)."""
    head, *parts = s.split("\\frac")
    out = [head]
    for part in parts:
        out.append("\\frac")
        if part.startswith("{") or len(part) < 2:
            out.append(part)
        elif part[1] == "{":
            out.append("{" + part[0] + "}" + part[1:])
        else:
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "".join(out)


def fix_sqrt(s: str) -> str:
    """\\sqrt2 -> \\sqrt{2}."""
    return re.sub(r"\\sqrt([^{\[\\])", r"\\sqrt{\1}", s)


def fix_slash(s: str) -> str:
    """'3/4' (two integers, nothing else) -> \\frac{3}{4}."""
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def remove_units(s: str) -> str:
    """Drop a unit written as trailing text after a number: '5\\text{ cm}^2' -> '5'.
    Only when something with a digit comes before it, so '\\text{Devon}' is kept."""
    m = re.fullmatch(r"(.*\d.*?)\s*\\(?:text|textnormal|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(\^\{?\d\}?)?", s)
    return m.group(1) if m else s


# ----------------------------------------------------------------------------- normalise and compare

def normalize(answer: str) -> str:
    """One canonical string per answer (the standard MATH normalisations, in their order)."""
    s = answer.replace("\n", "").replace("\\!", "")
    for thin_space in ("\\,", "\\;", "\\:", "\\ "):
        s = s.replace(thin_space, " ")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = remove_units(s.strip())
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5": a short variable name before a single "=" is not part of the value
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs.strip()) <= 2:
        s = rhs
    s = s.replace(" ", "")
    s = fix_sqrt(s)
    s = fix_fracs(s)
    m = re.fullmatch(r"\\(?:text|textbf|mbox|mathrm)\{(.*)\}", s)  # "\text{(C)}" -> "(C)"
    if m and "{" not in m.group(1):
        s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(\{,\}\d{3}|,\d{3})+(\.\d+)?", s):  # 10{,}000 or 10,000 -> 10000
        s = s.replace("{,}", "").replace(",", "")
    return fix_slash(s)


def value(s: str) -> tuple[Fraction, bool] | None:
    """The exact value of a normalised plain decimal ("2.50") or integer fraction ("\\frac{1}{2}"),
    and whether it was written as a fraction; None for anything else."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return Fraction(s), False
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(3)):
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1), True
    return None


def is_equiv(a: str | None, b: str | None) -> bool:
    """True when two final answers are the same after normalisation, or when a plain decimal has
    the exact value of the other answer's decimal or integer fraction (0.50 = 0.5 = 1/2). Two
    fractions are compared as written, as in the standard checker (2/4 is not a final 1/2).
    None never matches."""
    if a is None or b is None:
        return False
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    va, vb = value(na), value(nb)
    return va is not None and vb is not None and not (va[1] and vb[1]) and va[0] == vb[0]
