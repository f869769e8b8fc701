"""Write the README's benchmark tables from ``benchmarks/results/*.json``.

Run: ``python benchmarks/readme_tables.py [--check] [--readme README.md] [--results DIR]``.

The README holds generated blocks between marker comments, ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``: ``results`` (the results table on the first screen), ``penalty``,
``spectrum``, ``fft``, ``svb``, ``regularizer`` and ``model_scale`` (the tables of the
Benchmarks section, one per JSON file), ``jia_fmnist`` (record 2's tables, from
``records/jia_fmnist/*/summary.*``), ``guo_2norm`` (record 1, from
``records/guo_2norm/guo_2norm.json``) and ``norm_layers`` (from
``records/norm_layers/norm_layers.json``). Without
``--check`` the blocks are rewritten in place; with it nothing is written and the exit status is
1 when the README differs from what the JSON gives (a diff is printed). Prose outside the blocks
is not touched.

The JSON is read strictly: a results file of an unknown benchmark, or a field this script does
not know, is an error (exit status 2) in both modes, so that a benchmark that starts recording
something new cannot be left out of the README silently. Teach this script the field, then run
it. The first-screen table also quotes the experiment records in ``records/`` (Fashion-MNIST
comparison, Figure 4.1), read from their JSON the same way.

Standard library only: the script runs without torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/readme_tables.py"


class SchemaError(ValueError):
    """A results file this script cannot render faithfully (unknown file, field or row)."""


# --- reading -------------------------------------------------------------------------------

ENVIRONMENT = {"convspec", "git_commit", "torch", "numpy", "python", "cpu", "cpu_count",
               "torch_threads", "cuda"}


def check_fields(obj: dict, required: Iterable[str], optional: Iterable[str], where: str) -> dict:
    """``obj`` itself, after checking that it has every ``required`` key and no key outside
    ``required`` and ``optional``."""
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    required, optional = set(required), set(optional)
    missing = sorted(required - obj.keys())
    unknown = sorted(obj.keys() - required - optional)
    if missing:
        raise SchemaError(f"{where}: missing field(s) {missing}")
    if unknown:
        raise SchemaError(
            f"{where}: field(s) {unknown} unknown to {COMMAND}; teach it these fields (render "
            "them or list them as known) so that the README shows what the benchmark records")
    return obj


def load_results(results_dir: Path) -> Dict[str, dict]:
    """Every ``*.json`` of ``results_dir`` by benchmark name, each checked against its schema."""
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise SchemaError(f"{results_dir}: no results (*.json)")
    records = {}
    for path in files:
        record = json.loads(path.read_text())
        name = record.get("benchmark") if isinstance(record, dict) else None
        if name not in SCHEMAS:
            raise SchemaError(f"{path}: benchmark {name!r} is unknown to {COMMAND} "
                              f"(known: {sorted(SCHEMAS)})")
        if path.stem != name:
            raise SchemaError(f"{path}: holds benchmark {name!r}; expected {name}.json")
        SCHEMAS[name](record, str(path))
        records[name] = record
    missing = sorted(set(SCHEMAS) - records.keys())
    if missing:
        raise SchemaError(f"{results_dir}: no results for {missing}")
    return records


def check_penalty(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "dtype", "rows", "environment"}, set(), where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    for i, row in enumerate(record["rows"]):
        check_fields(row, {"case", "baseline", "baseline_s", "exact_s", "ratio", "target", "met"},
                     {"rel_diff_float64"}, f"{where}: rows[{i}]")
        penalty_kind(row)


def check_spectrum(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "dtype", "rows", "environment"}, {"note"}, where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    for i, row in enumerate(record["rows"]):
        check_fields(
            row, {"case", "route", "baseline", "baseline_s", "route_s", "ratio", "n_products",
                  "target", "met"},
            set(SPECTRUM_AGREEMENT) | {
                "n_solves", "n_factorizations", "sigma_max_error", "sigma_min_error",
                "converged", "sigma_max", "sigma_min", "n_values", "bound",
                "bound_s", "bound_over_sigma_max", "reference_tol_1e10", "reference_s",
                "reference_products"},
            f"{where}: rows[{i}]")


FFT_TIMED = ("reference", "convspec", "pairs_torch_svdvals", "every_frequency")
FFT_ROW = {"torch_threads", "reference_s", "convspec_s", "ratio", "pairs_torch_svdvals_s",
           "every_frequency_s", "runs_s", "n_svd_reference", "n_svd_convspec", "max_rel_diff",
           "max_abs_diff_over_sigma_max", "rel_diff_sum_of_squares_reference",
           "rel_diff_sum_of_squares_convspec", "met"}


def check_fft(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "dtype", "case", "reference", "repeats", "target",
                          "omp_num_threads", "dense_check", "rows", "environment"}, set(), where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    check_fields(record["dense_check"], {"case", "convspec_max_abs_diff_over_sigma_max",
                                         "reference_max_abs_diff_over_sigma_max"}, set(),
                 f"{where}: dense_check")
    for i, row in enumerate(record["rows"]):
        check_fields(row, FFT_ROW, set(), f"{where}: rows[{i}]")
        check_fields(row["runs_s"], FFT_TIMED, set(), f"{where}: rows[{i}]: runs_s")


SVB_METHODS = ("convspec.svb_", "convspec.svb_ float32", "naive float32", "naive float64")


def check_svb(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "eps", "repeats", "rows", "target", "environment"},
                 {"note"}, where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    for i, row in enumerate(record["rows"]):
        w = f"{where}: rows[{i}]"
        check_fields(row, {"model", "weight_layers", "parameters", "values_clipped",
                           "values_total", "routes", "routes_float32", "seconds",
                           "speedup_vs_naive_float32", "speedup_vs_naive_float64",
                           "speedup_float32_vs_naive_float32", "max_rel_err_in_float32_eps"},
                     set(), w)
        check_fields(row["seconds"], SVB_METHODS, set(), f"{w}: seconds")
        check_fields(row["max_rel_err_in_float32_eps"], SVB_METHODS, set(),
                     f"{w}: max_rel_err_in_float32_eps")


REGULARIZER_ROW = {"model", "input", "batch", "layers", "repeats", "step_s", "regularizer_s",
                   "per_layer_s", "regularizer_percent", "per_layer_percent",
                   "rel_diff_per_layer", "met", "step_cpu_s", "regularizer_cpu_s",
                   "regularizer_cpu_percent", "step_macs", "regularizer_macs",
                   "regularizer_macs_percent"}


def check_regularizer(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "dtype", "target", "rows", "environment"}, set(), where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    for i, row in enumerate(record["rows"]):
        check_fields(row, REGULARIZER_ROW, set(), f"{where}: rows[{i}]")


MODEL_SCALE_FACT = {"case", "channels", "size", "repeats", "nested_s", "banded_s", "speedup",
                    "nested_flops", "banded_flops", "nested_bytes", "banded_bytes",
                    "nested_gflops_per_s", "banded_gflops_per_s"}
MODEL_SCALE_EXT = {"case", "channels", "size", "nested_s", "banded_s", "speedup", "sigma_max",
                   "sigma_min", "converged", "n_factorizations", "rel_diff_nested_banded"}
MODEL_SCALE_WRN = {"layer", "count", "plan", "flops", "bytes", "banded_flops", "banded_bytes",
                   "projected_s"}


def check_model_scale(record: dict, where: str) -> None:
    check_fields(record, {"benchmark", "dtype", "factorisations", "extremes", "wrn",
                          "rate_gflops_per_s", "wrn_projected_s", "wrn_peak_bytes", "target",
                          "met", "environment"}, set(), where)
    check_fields(record["environment"], ENVIRONMENT, set(), f"{where}: environment")
    for key, fields, optional in (("factorisations", MODEL_SCALE_FACT, set()),
                                  ("extremes", MODEL_SCALE_EXT, {"rel_diff_dense"}),
                                  ("wrn", MODEL_SCALE_WRN, set())):
        for i, row in enumerate(record[key]):
            check_fields(row, fields, optional, f"{where}: {key}[{i}]")


SCHEMAS: Dict[str, Callable[[dict, str], None]] = {
    "penalty": check_penalty, "spectrum": check_spectrum, "fft": check_fft, "svb": check_svb,
    "regularizer": check_regularizer, "model_scale": check_model_scale,
}


# --- formatting ----------------------------------------------------------------------------

def sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, trailing zeros kept (``1.00``, ``5690``,
    ``0.000557``); an exponent (``6.8e4``) only outside [1e-4, 1e5)."""
    if x == 0:
        return "0"
    x = float(f"{x:.{digits - 1}e}")  # rounded first, so that 0.99996 counts as 1.00
    e = math.floor(math.log10(abs(x)))
    if not -4 <= e < 5:
        return exp(x, digits)
    return f"{x:.{max(digits - 1 - e, 0)}f}"


def exp(x: float, digits: int = 1) -> str:
    """``x`` as ``4e-16`` / ``3.4e-8`` / ``6.8e4``: no ``+`` and no leading zero in the exponent."""
    if x == 0:
        return "0"
    mantissa, e = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(e)}"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def machine(env: dict, note: Optional[str] = None) -> str:
    """One line naming the machine and code a results file was measured on."""
    commit = env["git_commit"] or "unknown"
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    gpu = "no GPU" if env["cuda"] is None else f"CUDA {env['cuda']}"
    threads = f"{env['torch_threads']} torch thread" + ("s" if env["torch_threads"] != 1 else "")
    line = (f"Measured on {env['cpu']}, {env['cpu_count']} cores, {threads}, {gpu}; "
            f"torch {env['torch']}, convspec {env['convspec']} at {short}.")
    return line + (f" Note: {note}" if note else "")


# --- the Benchmarks section ----------------------------------------------------------------

def penalty_kind(row: dict) -> tuple:
    """``(layer, kind)`` of a penalty row: ``'Conv2d'`` unless the case starts with a layer name
    (``'Conv1d: ...'``); ``kind`` from the baseline: ``dense``, ``flat`` or ``interior``."""
    m = re.fullmatch(r"(?:(Conv[123]d): )?(.*)", row["case"])
    layer = m.group(1) or "Conv2d"
    if row["baseline"] == "dense":
        kind = "dense"
    elif row["baseline"] == "interior-only":
        kind = "interior"
    elif row["baseline"].startswith("exact N="):
        kind = "flat"
    else:
        raise SchemaError(f"penalty row {row['case']!r}: baseline {row['baseline']!r} is "
                          f"unknown to {COMMAND}")
    return layer, kind


def penalty_block(record: dict) -> str:
    rows = []
    for r in record["rows"]:
        _, kind = penalty_kind(r)
        ratio = f"{sig(r['ratio'])}x faster" if kind == "dense" else sig(r["ratio"])
        agree = exp(r["rel_diff_float64"]) if "rel_diff_float64" in r else ""
        rows.append([r["case"], f"{sig(r['baseline_s'])} ({r['baseline']})", sig(r["exact_s"]),
                     ratio, r["target"], yes(r["met"]), agree])
    header = ["case", "baseline (s)", "exact (s)", "ratio", "target", "met",
              "rel. diff vs dense (float64)"]
    return table(header, rows) + "\n\n" + machine(record["environment"])


SPECTRUM_AGREEMENT = ("rel_diff_sigma_max", "rel_diff_sigma_min", "max_abs_diff_over_sigma_max",
                      "rel_diff_sum_of_squares", "rel_diff_sigma_max_vs_iterative",
                      "rel_diff_vs_reference")


def spectrum_block(record: dict) -> str:
    rows = []
    for r in record["rows"]:
        base = "n/a" if r["baseline_s"] is None else sig(r["baseline_s"], 4)
        ratio = "n/a" if r["ratio"] is None else (
            f"{exp(r['ratio'], 2)}x" if r["ratio"] >= 1e4 else f"{sig(r['ratio'])}x")
        products = str(r["n_products"])
        if "n_solves" in r:
            products += f" + {r['n_solves']} solves"
        if r.get("n_factorizations"):
            products += f" + {r['n_factorizations']} factorisations"
        if r.get("sigma_min_error") is not None and r.get("sigma_min"):
            products += f"; sigma_min certified to {exp(r['sigma_min_error'] / r['sigma_min'])}"
        if r.get("converged") is False:
            products += " (not converged)"
        diffs = [r[k] for k in SPECTRUM_AGREEMENT if k in r]
        agree = exp(max(diffs), 2) if diffs else "n/a"
        rows.append([r["case"], f"{base} ({r['baseline']})", f"{sig(r['route_s'])} ({r['route']})",
                     ratio, products, agree, r["target"], yes(r["met"])])
    header = ["case", "dense baseline (s)", "convspec (s)", "ratio", "operator products",
              "agreement (rel.)", "target", "met"]
    return table(header, rows) + "\n\n" + machine(record["environment"], record.get("note"))


def fft_block(record: dict) -> str:
    def timed(r: dict, key: str) -> str:
        runs = r["runs_s"][key]
        return f"{sig(r[key + '_s'])} ({sig(min(runs))}-{sig(max(runs))})"

    rows = [[str(r["torch_threads"]), timed(r, "reference"), timed(r, "convspec"),
             f"**{sig(r['ratio'])}x**", f"{r['n_svd_reference']} / {r['n_svd_convspec']}",
             f"{exp(r['max_abs_diff_over_sigma_max'], 2)} / {exp(r['max_rel_diff'], 2)}",
             timed(r, "pairs_torch_svdvals"), timed(r, "every_frequency"), yes(r["met"])]
            for r in record["rows"]]
    header = ["torch threads", "reference (s)", "convspec (s)", "ratio",
              "SVDs: reference / convspec", "max diff / sigma_max, max rel. diff per value",
              "ablation: pairs, torch's LAPACK (s)",
              "ablation: every frequency, numpy's LAPACK (s)", "met"]
    dense = record["dense_check"]
    sums = max(max(r["rel_diff_sum_of_squares_reference"], r["rel_diff_sum_of_squares_convspec"])
               for r in record["rows"])
    omp = record["omp_num_threads"]
    return (table(header, rows)
            + f"\n\n{record['case']}, {record['dtype']}; reference: {record['reference']}. Median "
            f"(min-max) of {record['repeats']} interleaved repeats; `OMP_NUM_THREADS={omp}` "
            "(numpy's OpenBLAS threads). Both spectra give `sum sigma^2 = ||M||_F^2` "
            + ("exactly" if sums == 0 else f"to {exp(sums)}") + "; against the dense SVD at "
            f"{dense['case']}: convspec {exp(dense['convspec_max_abs_diff_over_sigma_max'], 2)}, "
            f"reference {exp(dense['reference_max_abs_diff_over_sigma_max'], 2)} of sigma_max. "
            f"Target: {record['target']}.\n"
            + machine(record["environment"], "the torch threads of each row are in its first "
                      "column; the environment records those the process ended with."))


def svb_block(record: dict) -> str:
    rows = []
    for r in record["rows"]:
        s, err = r["seconds"], r["max_rel_err_in_float32_eps"]
        rows.append([
            r["model"], str(r["weight_layers"]),
            f"{', '.join(r['routes'])} / {', '.join(r['routes_float32'])}",
            f"{r['values_clipped']} / {r['values_total']}",
            sig(s["convspec.svb_"]), sig(s["convspec.svb_ float32"]),
            sig(s["naive float32"]), sig(s["naive float64"]),
            f"**{sig(r['speedup_float32_vs_naive_float32'], 2)}x**",
            f"{sig(r['speedup_vs_naive_float64'], 2)}x",
            f"{sig(err['convspec.svb_'], 2)} / {sig(err['convspec.svb_ float32'], 2)} / "
            f"{sig(err['naive float32'], 2)}",
        ])
    header = ["model", "weight layers", "route: float64 / float32", "values clipped",
              "`svb_` (s)", "`svb_(dtype=float32)` (s)", "naive float32 loop (s)",
              "naive float64 loop (s)", "speedup: float32 `svb_` vs float32 loop",
              "float64 `svb_` vs float64 loop",
              "max error in float32 eps: `svb_` / float32 `svb_` / float32 loop"]
    return (table(header, rows) + f"\n\neps = {record['eps']}, median of {record['repeats']}; "
            f"target: {record['target']}.\n" + machine(record["environment"], record.get("note")))


def regularizer_block(record: dict) -> str:
    rows = [[r["model"], r["input"], str(r["batch"]), str(r["layers"]),
             sig(r["step_s"] * 1e3), sig(r["regularizer_s"] * 1e3),
             f"{sig(r['regularizer_percent'], 2)}%", f"{sig(r['regularizer_cpu_percent'], 2)}%",
             f"{sig(r['regularizer_macs_percent'], 2)}%", sig(r["per_layer_s"] * 1e3),
             f"{sig(r['per_layer_percent'], 2)}%", exp(r["rel_diff_per_layer"]), yes(r["met"])]
            for r in record["rows"]]
    header = ["model", "input", "batch", "layers", "step (ms)", "`reg()` fwd+bwd (ms)",
              "share of step", "share of CPU time", "share of multiply-adds",
              "per-layer terms (ms)", "share", "rel. diff", "met"]
    repeats = ", ".join(sorted({str(r["repeats"]) for r in record["rows"]}))
    return (table(header, rows) + f"\n\n{record['dtype']}, median of {repeats} interleaved "
            f"repeats; target: {record['target']}.\n" + machine(record["environment"]))


def gb(n: float) -> str:
    return f"{n / 1e9:.2g}" if n < 1e9 else f"{n / 1e9:.1f}"


def model_scale_block(record: dict) -> str:
    fact = [[r["case"], sig(r["banded_s"]), sig(r["nested_s"]), f"{sig(r['speedup'], 2)}x",
             f"{exp(r['banded_flops'])} / {exp(r['nested_flops'])}",
             f"{gb(r['banded_bytes'])} / {gb(r['nested_bytes'])}",
             f"{sig(r['banded_gflops_per_s'], 2)} / {sig(r['nested_gflops_per_s'], 2)}"]
            for r in record["factorisations"]]
    out = table(["Gram factorisation", "band (s)", "nested (s)", "speedup",
                 "flops: band / nested", "GB: band / nested", "Gflop/s: band / nested"], fact)
    ext = []
    for r in record["extremes"]:
        agree = exp(r["rel_diff_nested_banded"])
        if "rel_diff_dense" in r:
            agree += f" (vs dense SVD: {exp(r['rel_diff_dense'])})"
        ext.append([r["case"], sig(r["banded_s"]), sig(r["nested_s"]),
                    f"{sig(r['speedup'], 2)}x", yes(r["converged"]), agree])
    out += "\n\n" + table(["sigma_max and sigma_min", "through the band (s)",
                            "through nested dissection (s)", "speedup", "converged",
                            "rel. diff"], ext)
    wrn = [[r["layer"], str(r["count"]), r["plan"], exp(r["flops"]), exp(r["banded_flops"]),
            gb(r["bytes"]), gb(r["banded_bytes"]), sig(r["projected_s"] / 60, 2)]
           for r in record["wrn"]]
    out += "\n\n" + table(["WRN-28-10 conv (at its input size)", "layers", "plan",
                            "flops per layer (3 factorisations)", "flops, band only",
                            "GB", "GB, band only", "projected min (all such layers)"], wrn)
    rate = record["rate_gflops_per_s"]
    out += (f"\n\nWRN-28-10 in all: **{sig(record['wrn_projected_s'] / 60, 3)} min** projected at "
            f"{sig(rate, 3)} Gflop/s (the best nested rate measured above), peak "
            f"**{gb(record['wrn_peak_bytes'])} GB**; target: {record['target']}; met: "
            f"{yes(record['met'])}.\n" + machine(record["environment"]))
    return out


# --- the first screen ----------------------------------------------------------------------

def only(items: Iterable, what: str):
    """The one element of ``items`` (a list of rows or a set of values)."""
    items = list(items)
    if len(items) != 1:
        raise SchemaError(f"first-screen table: expected one {what}, found {len(items)}")
    return items[0]


def per_row(cells: Iterable[str]) -> str:
    """``'a / b'``, or ``'a'`` when every row says the same."""
    cells = list(cells)
    return cells[0] if len(set(cells)) == 1 else " / ".join(cells)


def at_most(target: str) -> str:
    """``'<= 1.2'`` -> ``'1.2'``."""
    m = re.fullmatch(r"<= (\S+)", target)
    if m is None:
        raise SchemaError(f"first-screen table: target {target!r} is not '<= X'")
    return m.group(1)


def spaced(params: str) -> str:
    """``'g=h=16, N=16'`` -> ``'g = h = 16, N = 16'``."""
    return params.replace("=", " = ")


def row_by_case(record: dict, case: str) -> dict:
    rows = [r for r in record["rows"] if r.get("case", r.get("model")) == case]
    if len(rows) != 1:
        raise SchemaError(f"first-screen table: {record['benchmark']}.json has {len(rows)} rows "
                          f"{case!r}, expected one; update first_screen_block in {COMMAND}")
    return rows[0]


def first_screen_block(records: Dict[str, dict], records_dir: Path) -> str:
    pen = records["penalty"]["rows"]

    def by(layer: str, kind: str) -> List[dict]:
        return [r for r in pen if penalty_kind(r) == (layer, kind)]

    rows = []

    d = only(by("Conv2d", "dense"), "Conv2d dense penalty row")
    rows.append([
        f"exact penalty + gradient vs the dense operator, {spaced(d['case'].split(', ', 1)[1])}",
        f"**{sig(d['ratio'], 2)}x** faster ({sig(d['exact_s'] * 1e3, 2)} ms vs "
        f"{sig(d['baseline_s'], 2)} s), equal to {exp(d['rel_diff_float64'])}",
        f"{d['target']}x"])
    f = only(by("Conv2d", "flat"), "Conv2d flat-in-N penalty row")
    sizes = re.fullmatch(r"exact (N=\S+ vs N=\S+), .*", f["case"]).group(1)
    rows.append([f"exact penalty at {spaced(sizes)}", f"**{f['ratio']:.2f}x** (flat in N)",
                 f"within {at_most(f['target'])}x"])
    inner = by("Conv2d", "interior")
    if not inner:
        raise SchemaError("first-screen table: no interior-only penalty row")
    widths = " / ".join(re.search(r"g=h=(\d+)", r["case"]).group(1) for r in inner)
    targets = {r["target"] for r in inner}
    rows.append([f"exact vs the interior-only penalty, g = h = {widths}, k = 3",
                 "**" + " / ".join(f"{r['ratio']:.2f}x" for r in inner) + "** the time",
                 f"within {at_most(only(targets, 'interior-only target'))}x"])

    layers = ("Conv1d", "Conv3d")
    dense = [only(by(layer, "dense"), f"{layer} dense penalty row") for layer in layers]
    flat = [only(by(layer, "flat"), f"{layer} flat-in-N penalty row") for layer in layers]
    rows.append([
        "Conv1d / Conv3d: exact penalty + gradient vs the dense operator, "
        + " / ".join(spaced(r["case"].split(", ", 1)[1]) for r in dense),
        "**" + " / ".join(f"{sig(r['ratio'], 2)}x" for r in dense) + "** faster, equal to "
        + " / ".join(exp(r["rel_diff_float64"]) for r in dense),
        per_row(f"{r['target']}x" for r in dense)])
    rows.append([
        "Conv1d / Conv3d: exact penalty at "
        + " / ".join(spaced(re.fullmatch(r".*exact (N=\S+ vs N=\S+), .*", r["case"]).group(1))
                     for r in flat),
        "**" + " / ".join(f"{r['ratio']:.2f}x" for r in flat) + "** (flat in N)",
        per_row(f"within {at_most(r['target'])}x" for r in flat)])

    svb = records["svb"]
    w = row_by_case(svb, "WRN-28-10")
    if ">= 5x" not in svb["target"]:
        raise SchemaError(f"first-screen table: svb target {svb['target']!r} is not '>= 5x'; "
                          f"update first_screen_block in {COMMAND}")
    err = w["max_rel_err_in_float32_eps"]
    rows.append([
        "one `svb_` pass over WRN-28-10 vs a per-layer `torch.linalg.svd` loop",
        f"`dtype=float32`: **{sig(w['speedup_float32_vs_naive_float32'], 2)}x** faster than the "
        f"float32 loop, {sig(err['convspec.svb_ float32'], 2)} float32-eps from exact (loop: "
        f"{sig(err['naive float32'], 2)}); default float64: "
        f"**{sig(w['speedup_vs_naive_float64'], 2)}x** faster than the float64 loop, "
        f"{sig(err['convspec.svb_'], 1)} eps",
        ">= 5x at float32 precision"])

    spec = records["spectrum"]
    z = row_by_case(spec, "zero padding, g=h=16, N=32 (n=16384): sigma_max, sigma_min")
    agree = max(z[k] for k in SPECTRUM_AGREEMENT if k in z)
    rows.append([
        "sigma_max and sigma_min with certified error bounds, zero padding, g = h = 16, N = 32 "
        "(n = 16384), vs dense",
        f"**{sig(z['ratio'])}x** faster ({sig(z['route_s'], 2)} s vs {sig(z['baseline_s'])} s), "
        f"{z['n_products']} products + {z['n_solves']} solves"
        + (f" + {z['n_factorizations']} factorisations" if z.get("n_factorizations") else "")
        + f", agree to {exp(agree)}",
        z["target"]])
    c = row_by_case(spec, "circular, g=h=64, N=32 (n=65536): all singular values")
    gib = re.search(r"\d+ GiB", c["baseline"])
    if gib is None:
        raise SchemaError(f"first-screen table: no memory size in {c['baseline']!r}")
    rows.append([
        f"full spectrum, circular padding, g = h = 64, N = 32 ({c['n_values']} values)",
        f"**{sig(c['route_s'], 2)} s** (dense: ~{c['baseline_s'] / 3600:.0f} h extrapolated, "
        f"{gib.group(0)})",
        c["target"]])

    summary = json.loads((records_dir / "demo_fmnist" / "summary.json").read_text())
    names = {"sgd": "SGD", "svb+bbn": "SVB+BBN", "frobenius": "Frobenius", "svb": "SVB"}
    cfg = summary["config"]
    results = [summary["results"][m] for m in summary["methods"]]
    images = f"{cfg['n_train']} images" if cfg.get("n_train") else "all 60000 images"
    rows.append([
        f"{cfg['model'].replace('convnet', 'ConvNet')}, Fashion-MNIST ({images}, {cfg['epochs']} "
        f"epochs), {len(summary['seeds'])} seeds (`make demo`): test error "
        + " / ".join(names[r["method"]] for r in results),
        " / ".join(f"{100 * r['final_test_error']['mean']:.2f} +/- "
                   f"{100 * r['final_test_error']['std']:.2f}" for r in results) + " %",
        "[details, 95% CIs](#the-demo-make-demo)"])

    fig = json.loads((records_dir / "guo_fig41" / "guo_fig41.json").read_text())
    last_max = [k["sigma_max"][-1] for k in fig["kernels"]]
    last_min = [k["sigma_min"][-1] for k in fig["kernels"]]
    steps = {k["iteration"][-1] for k in fig["kernels"]}
    rows.append([
        f"Figure 4.1 (Algorithm 3.1, {fig['config']['step_rule']} steps, "
        f"N = {fig['config']['size']}), {len(fig['kernels'])} kernels",
        f"sigma_max {min(last_max):.3f}-{max(last_max):.3f}, sigma_min "
        f"{min(last_min):.3f}-{max(last_min):.3f} at step "
        f"{only(steps, 'final step')}",
        "paper: both near 1"])

    envs = [r["environment"] for r in records.values()]
    envs += [summary["environment"], fig["environment"]]
    machines = {(e["cpu"], e["cpu_count"], e["cuda"], ".".join(e["torch"].split(".")[:2]))
                for e in envs}
    if len(machines) == 1 and next(iter(machines))[2] is None:
        cpu, cores, _, torch_version = next(iter(machines))
        head = f"measured on {cores} CPU cores ({cpu}), torch {torch_version}"
    else:
        head = "measured on the machines named in [Benchmarks](#benchmarks)"
    return table([head, "result", "target"], rows)


def jia_fmnist_block(records_dir: Path) -> str:
    """Record 2: per model, the table ``convspec compare`` wrote (``summary.md``, from its
    ``summary.json``), or how many of its runs have finished while it is still running."""
    parts = []
    # convnet-38-long: the longer-budget check, shown once it has started
    for model in ("convnet-20", "convnet-38", "convnet-38-long"):
        folder = records_dir / "jia_fmnist" / model
        summary = folder / "summary.json"
        title = model.replace("convnet", "ConvNet").replace("-long", ", longer budget")
        if model.endswith("-long") and not (summary.exists()
                                            or (records_dir / "fmnist_runs" / model).exists()):
            continue
        if summary.exists():
            data = json.loads(summary.read_text())
            cfg = data["config"]
            parts.append(f"**{title}**, {cfg['epochs']} epochs, seeds "
                         f"{', '.join(map(str, data['seeds']))} "
                         f"([`records/jia_fmnist/{model}/`](records/jia_fmnist/{model}/)):\n\n"
                         + (folder / "summary.md").read_text().strip()
                         + f"\n\n![{title}: training and test error per epoch]"
                         f"(records/jia_fmnist/{model}/curves.png)")
        else:
            parts.append(f"**{title}**: not finished yet (its finished runs are in "
                         f"`records/fmnist_runs/{model}/`); the same command resumes it.")
    return "\n\n".join(parts)


def norm_layers_block(records_dir: Path) -> str:
    """Issue 13's record: true operator norms of normalised layers
    (``records/norm_layers/norm_layers.json``, from ``convspec reproduce norm-layers``)."""
    path = records_dir / "norm_layers" / "norm_layers.json"
    if not path.exists():
        return "Not recorded yet: run `convspec reproduce norm-layers`."
    record = json.loads(path.read_text())
    check_fields(record, {"experiment", "seeds", "forwards", "deel_torchlip", "environment",
                          "rows", "seconds"}, set(), str(path))
    rows = []
    for r in record["rows"]:
        check_fields(r, {"layer", "input_size", "method", "n", "converged", "route",
                         "sigma_max", "sigma_max_std", "sigma_max_all", "sigma_min",
                         "sigma_min_std", "sigma_min_all", "reshaped_sigma_max",
                         "reshaped_sigma_max_std", "reshaped_sigma_max_all"}, set(), str(path))
        smin = sig(r["sigma_min"]) + ("" if r["converged"] else " (not within 1e-6)")
        rows.append([f"{r['layer']} ({'x'.join(map(str, r['input_size']))})", r["method"],
                     f"{sig(r['sigma_max'], 4)} +/- {sig(r['sigma_max_std'], 2)}", smin,
                     sig(r["reshaped_sigma_max"], 4)])
    header = ["layer (input)", "normalisation", "operator sigma_max", "operator sigma_min",
              "reshaped sigma_max"]
    deel = ("deel-torchlip installed" if record["deel_torchlip"]
            else "deel-torchlip not installed in this run")
    return (table(header, rows) + f"\n\nMean +/- std over seeds {record['seeds']}; each power "
            f"iteration converged over {record['forwards']} training-mode forward passes; exact "
            f"operator values from `conv_singular_values` (certified); {deel}; "
            f"{record['seconds'] / 60:.0f} min.\n" + machine(record["environment"]))


def guo_2norm_block(records_dir: Path) -> str:
    """Record 1 (Guo's Frobenius penalty vs the 2-norm penalty): per kernel and init, from
    ``records/guo_2norm/guo_2norm.json`` (``convspec reproduce guo-2norm``)."""
    path = records_dir / "guo_2norm" / "guo_2norm.json"
    if not path.exists():
        return ("Not made yet: run `convspec reproduce guo-2norm --out records/guo_2norm`.")
    record = json.loads(path.read_text())

    def pm(mean, std, digits=1):
        return "-" if mean is None else f"{mean:.{digits}f} +/- {std:.{digits}f}"

    rows = []
    for e in record["summary"]:
        f, s, p = e["methods"]["frobenius"], e["methods"]["spectral"], e["paired"]
        ratio = ("-" if not p.get("pairs") or p.get("iteration_ratio_mean") is None
                 else f"{p['iteration_ratio_mean']:.2f} +/- {p['iteration_ratio_std']:.2f}")
        times = " / ".join("-" if m["time_s_mean"] is None else f"{m['time_s_mean']:.2f}"
                           for m in (f, s))
        rows.append([e["shape"], e["init"],
                     f"{f['reached']}/{f['runs']} / {s['reached']}/{s['runs']}",
                     pm(f["iterations_mean"], f["iterations_std"]),
                     pm(s["iterations_mean"], s["iterations_std"]), ratio, times,
                     f"{f['final_reached']}/{f['runs']} / {s['final_reached']}/{s['runs']}",
                     f"{f['rule']} / {s['rule']}"])
    header = ["kernel", "init", "reached: Frobenius / 2-norm", "iterations: Frobenius",
              "iterations: 2-norm", "ratio", "time to target: Frobenius / 2-norm (s)",
              "in target at 300: Frobenius / 2-norm", "step rule: Frobenius / 2-norm"]
    return (table(header, rows) + f"\n\n{record['compute_time_s'] / 60:.0f} min of compute. "
            + machine(record["environment"]))


BLOCKS = {
    "guo_2norm": lambda records, records_dir: guo_2norm_block(records_dir),
    "jia_fmnist": lambda records, records_dir: jia_fmnist_block(records_dir),
    "norm_layers": lambda records, records_dir: norm_layers_block(records_dir),
    "results": lambda records, records_dir: first_screen_block(records, records_dir),
    "penalty": lambda records, records_dir: penalty_block(records["penalty"]),
    "spectrum": lambda records, records_dir: spectrum_block(records["spectrum"]),
    "fft": lambda records, records_dir: fft_block(records["fft"]),
    "svb": lambda records, records_dir: svb_block(records["svb"]),
    "regularizer": lambda records, records_dir: regularizer_block(records["regularizer"]),
    "model_scale": lambda records, records_dir: model_scale_block(records["model_scale"]),
}


# --- the README ----------------------------------------------------------------------------

def render(readme: str, records: Dict[str, dict], records_dir: Path = ROOT / "records") -> str:
    """``readme`` with every generated block rewritten from ``records`` (the benchmark results)
    and the experiment records in ``records_dir``."""
    for name, make in BLOCKS.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), flags=re.S)
        found = pattern.findall(readme)
        if len(found) != 1:
            raise SchemaError(f"README: expected one block {start} ... {end}, found {len(found)}")
        body = make(records, records_dir)
        readme = pattern.sub(lambda _: f"{start}\n\n{body}\n\n{end}", readme)
    return readme


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the README differs from the JSON")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--records", type=Path, default=ROOT / "records",
                        help="experiment records quoted on the first screen")
    args = parser.parse_args(argv)
    try:
        old = args.readme.read_text()
        new = render(old, load_results(args.results), args.records)
    except (SchemaError, OSError, json.JSONDecodeError) as e:
        print(f"readme_tables: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"readme_tables: error: a record lacks the field {e}", file=sys.stderr)
        return 2
    if args.check:
        if old != new:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), str(args.readme), "generated"))
            print(f"readme_tables: {args.readme} differs from {args.results}; run {COMMAND}",
                  file=sys.stderr)
            return 1
        return 0
    if old != new:
        args.readme.write_text(new)
        print(f"rewrote the benchmark tables of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
