"""The trusted EvalPlus checker (HumanEval+ / MBPP+), run inside the sandbox after the sample's program was compiled:
the harness (sandboxed/harness.py) calls run(candidate_code, namespace).

Differential testing after evalplus/eval/__init__.py and _special_oracle.py (v0.2/v0.3): the canonical solution's
outputs on base_input + plus_input are the expected outputs; each input gets max(1 s, 4 x the reference's time);
floats compare with np.allclose(rtol=1e-7, atol) semantics. sandbox.evalplus_checker appends the problem:
    PROBLEM = {...}    # task_id, prompt, canonical_solution, entry_point, base_input, plus_input, atol, dataset
"""
import copy
import json  # noqa: F401 (sandbox.evalplus_checker appends PROBLEM = json.loads(...))
import math
import signal
import time

MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR = 1.0, 4.0
# MBPP+ tasks whose JSON inputs stand for tuples (evalplus/data/mbpp.py: mbpp_deserialize_inputs)
TUPLE_ARGS = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740,
              744, 809}
TUPLE_LISTS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
PROBLEM: dict = {}                    # appended by sandbox.evalplus_checker
NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
          "intersection_array", "find_dissimilar", "Diff"}


class SampleTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise SampleTimeout("input exceeded its time limit")


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def deserialize(dataset, task_id, inputs):
    """evalplus/data/mbpp.py: mbpp_deserialize_inputs (JSON has no tuples, sets or complex numbers)."""
    if dataset != "mbpp":
        return inputs
    t = int(task_id.split("/")[-1])
    if t in TUPLE_ARGS:
        return [[tuple(a) for a in inp] for inp in inputs]
    if t in TUPLE_LISTS:
        return [[[tuple(l) for l in a] for a in inp] for inp in inputs]
    if t in (75, 413, 444, 753):
        return [[[tuple(l) for l in inp[0]]] + [inp[1]] for inp in inputs]
    if t in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if t == 115:
        return [[[set(i) if isinstance(i, list) and len(i) else {} for i in inp[0]]] for inp in inputs]
    if t == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if t in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if t in (259, 401, 445):
        return [[tuple(tuple(l) for l in a) for a in inp] for inp in inputs]
    if t == 278:
        return [[tuple(tuple(i) if isinstance(i, list) else i for i in inp[0])] for inp in inputs]
    if t == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if t == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if t == 252:
        return [[complex(inp[0])] for inp in inputs]
    if t in (580, 615, 791):
        return [_tuples(inp) for inp in inputs]
    return inputs


def poly(xs, x):                                      # oracle of HumanEval/32
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def surface_area(base_edge, height):                  # oracle of Mbpp/581
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 4 * (base_edge * slant) / 2)


def digit_distance(num1, num2):                       # oracle of Mbpp/558
    a, b = str(num1), str(num2)
    w = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(w), b.zfill(w)))


def is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and all(isinstance(i, float) for i in x)


def allclose(a, b, atol, rtol=1e-07):
    """numpy.allclose on (nested) lists of numbers: |a - b| <= atol + rtol * |b|, NaN never close."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)):
            return False
        return all(allclose(x, y, atol, rtol) for x, y in zip(a, b))
    if not all(isinstance(v, (int, float)) for v in (a, b)):
        return False
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def run(candidate_code, namespace):
    p = PROBLEM
    dataset, entry = p["dataset"], p["entry_point"]
    plus = p["plus_input"] if isinstance(p["plus_input"], list) else []      # Mbpp/793 has {}
    inputs = deserialize(dataset, p["task_id"], p["base_input"] + plus)
    ref_ns = {"__name__": "__reference__"}
    exec(compile(p["prompt"] + p["canonical_solution"], "reference.py", "exec"), ref_ns)
    ref = ref_ns[entry]
    expected, limits = [], []
    for inp in inputs:
        t0 = time.perf_counter()
        out = ref(*copy.deepcopy(inp))
        limits.append(max(MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR * (time.perf_counter() - t0)))
        expected.append(out is not None if entry in NOT_NONE else out)
    exec(candidate_code, namespace)
    fn = namespace[entry]
    signal.signal(signal.SIGALRM, _alarm)
    for i, (inp, exp) in enumerate(zip(inputs, expected)):
        signal.setitimer(signal.ITIMER_REAL, limits[i])
        try:
            out = fn(*copy.deepcopy(inp))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        atol = p["atol"]
        exact = out == exp
        if dataset == "mbpp":
            if entry == "are_equivalent":
                exact = True
            elif entry == "sum_div":
                exact = exact or out == 0
            elif entry == "surface_Area":
                exact = exact or abs(out - surface_area(*inp)) <= atol
            elif entry == "digit_distance_nums":
                exact = exact or out == digit_distance(*inp)
            elif entry in SET_EQ:
                exact = set(out) == set(exp)
            elif entry in NOT_NONE:
                exact = out == exp if isinstance(out, bool) else exp == (out is not None)
        if dataset == "humaneval" and entry == "find_zero":
            assert abs(poly(*inp, out)) <= atol, f"input {i}: find_zero{tuple(inp)} = {out!r} is not a zero"
            continue
        if atol == 0 and is_floats(exp):
            atol = 1e-6
        if not exact and atol != 0:
            assert type(out) == type(exp) and allclose(out, exp, atol), f"input {i}: got {out!r}, expected {exp!r}"
        else:
            assert exact, f"input {i}: got {out!r}, expected {exp!r}"
