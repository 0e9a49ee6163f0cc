"""`spbench parity`: the same training with SP off (reference) and on, compared number by number.

A suite (TOML in suites/) lists cases; list-valued fields expand to the cross product.
Each case trains the same global batch twice: the reference in this process (SP=1, DP=1,
grad-accum = dp × ga, transformers' own SDPA attention unless packing), and the SP run on
a pool of local ranks (one pool per world size, reused across cases). It compares the
per-step loss and grad-norm curves, step-0 per-parameter gradients (not under ZeRO, where
they are partitioned) and, for DPO, rewards and log-probs.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.config import TrainConfig, from_dict
from runtime.train import DPO_KEYS, Trainer

from .errors import UsageError
from .launch import RankError, RankPool
from .results import provenance, results_doc, write_json_atomic
from .runs import train_on_rank
from .tolerances import TOLERANCES, ZERO

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
ZERO_CONFIGS = {2: "examples/ds_z2.json", 3: "examples/ds_z3.json"}
CASE_KEYS = {"name", "stage", "pref_loss", "method", "sp", "dp", "ga", "dtype", "packing", "model", "steps", "zero", "config"}

EPILOG = """examples:
  spbench parity                              # the default suite (suites/ci.toml)
  spbench parity --list
  spbench parity --suite full --backend nccl
  spbench parity --stage dpo --method zigzag --sp 4 --dtype float64 --steps 3
"""


@dataclass
class Case:
    """One parity case: the SP run's layout and the training it runs."""

    name: str
    stage: str
    method: str
    sp: int
    pref_loss: str | None = None
    dp: int = 1
    ga: int = 1
    dtype: str = "float64"
    packing: bool = False
    model: str = "tiny"
    steps: int = 3
    zero: int = 0
    config: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.sp * self.dp

    def train_config(self, sp_on: bool, device: str = "cpu") -> TrainConfig:
        """The SP run's config, or (sp_on=False) the reference: SP 1, DP 1, grad accum dp × ga."""
        values = {"model_name_or_path": self.model, "stage": self.stage, "dtype": self.dtype, "packing": self.packing,
                  "max_steps": self.steps, "device": device, **self.config}
        if self.pref_loss:
            values["pref_loss"] = self.pref_loss
        if sp_on:
            values.update(sequence_parallel_size=self.sp, sequence_parallel_mode=self.method,
                          gradient_accumulation_steps=self.ga)
            if self.zero:
                values.setdefault("deepspeed", ZERO_CONFIGS[self.zero])  # config may name another ZeRO file
        else:
            values.update(gradient_accumulation_steps=self.ga * self.dp)
            values.pop("deepspeed", None)  # the reference is plain torch
        return from_dict(values, source=f"case {self.name}")


def load_suite(name: str) -> tuple[str, list[Case]]:
    """Cases of suites/NAME.toml (or a path), expanded; unknown names answer with the nearest."""
    path = Path(name) if name.endswith(".toml") else SUITES_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.toml") if not p.stem.startswith("maxlen"))
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UsageError(f"no suite {name!r}; {hint}available: {', '.join(known)}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None
    defaults = data.get("defaults", {})
    cases: list[Case] = []
    for i, entry in enumerate(data.get("cases", [])):
        spec = {**defaults, **entry, "config": {**defaults.get("config", {}), **entry.get("config", {})}}
        unknown = set(spec) - CASE_KEYS
        if unknown:
            raise UsageError(f"{path}: case {i}: unknown field(s) {sorted(unknown)}; known: {sorted(CASE_KEYS)}")
        cases += expand(spec)
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UsageError(f"{path}: duplicate case names {sorted(dupes)}; give the cases distinct 'name' prefixes")
    return data.get("suite", {}).get("name", path.stem), cases


def expand(spec: dict) -> list[Case]:
    """Cross product of list-valued fields; names get the varying values appended."""
    axes = {k: v for k, v in spec.items() if isinstance(v, list)}
    out = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        fields = {**spec, **dict(zip(axes, combo))}
        prefix = fields.pop("name", None)
        parts = [fields["stage"], fields.get("pref_loss"), fields["method"], f"sp{fields['sp']}"]
        parts += [f"{k}{fields[k]}" for k in axes if k not in ("stage", "pref_loss", "method", "sp")]
        auto = "-".join(str(x) for x in parts if x)
        fields["name"] = f"{prefix}-{auto}" if prefix else auto
        try:
            out.append(Case(**fields))
        except TypeError as e:
            raise UsageError(f"case {fields['name']}: {e}") from None
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30) if a != b else 0.0


def dpo_error(case: Case, key: str, r: dict, s: dict) -> float:
    """Relative error of one DPO quantity. Rewards β(π − ρ) are differences of near-equal log-probs
    (0 at step 0), so they are measured against β·|log p|, the scale they are computed from.
    Accuracies (a 0/1 average that flips when a margin is ~0) are compared only in float64."""
    scale = abs(r[key])
    if key.startswith("rewards/"):
        beta = case.config.get("pref_beta", 0.1)
        scale = max(scale, beta * max(abs(r["logps/chosen"]), abs(r["logps/rejected"])))
    return abs(s[key] - r[key]) / scale if scale > 0 else abs(s[key] - r[key])


def compare(case: Case, ref: dict, sp: dict) -> dict:
    """Case result (schema spbench.results/1) from the reference and SP runs' outputs."""
    tol = TOLERANCES[case.dtype]
    gn_tol = max(tol["grad"], ZERO["grad_norm"]) if case.zero else tol["grad"]
    dpo_tol = max(tol["loss"], ZERO["dpo"]) if case.zero else tol["loss"]
    rm, sm = ref["metrics"], sp["metrics"]
    failures = []
    loss_err = [rel(s["loss"], r["loss"]) for r, s in zip(rm, sm)]
    gn_err = [rel(s["grad_norm"], r["grad_norm"]) for r, s in zip(rm, sm)]
    if len(rm) != len(sm):
        failures.append(f"step count {len(sm)} != reference {len(rm)}")
    for i, (le, ge) in enumerate(zip(loss_err, gn_err)):
        if not le <= tol["loss"]:
            failures.append(f"loss step {i}: rel err {le:.3g} > {tol['loss']:.0e} ({sm[i]['loss']!r} vs {rm[i]['loss']!r})")
        if not ge <= gn_tol:
            failures.append(f"grad_norm step {i}: rel err {ge:.3g} > {gn_tol:.0e}")
    worst_param, param_err = None, None
    if ref.get("grads") and sp.get("grads"):
        param_err, worst_param = max(((sp["grads"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30), n)
                                     for n, g in ref["grads"].items())
        if not param_err <= tol["grad"]:
            failures.append(f"step-0 grad of {worst_param}: rel err {param_err:.3g} > {tol['grad']:.0e}")
    dpo_err = None
    if case.stage == "dpo":
        dpo_err = max(dpo_error(case, k, r, s) for r, s in zip(rm, sm) for k in DPO_KEYS
                      if case.dtype == "float64" or k != "rewards/accuracies")
        if not dpo_err <= dpo_tol:
            failures.append(f"dpo rewards/logps: max rel err {dpo_err:.3g} > {dpo_tol:.0e}")
    return {
        **case_fields(case), "passed": not failures, "error": None,
        "tolerance": {"loss": tol["loss"], "grad": tol["grad"]},
        "metrics": {"max_loss_rel_err": max(loss_err, default=None), "max_grad_norm_rel_err": max(gn_err, default=None),
                    "max_param_grad_rel_err": param_err, "worst_param": worst_param, "max_dpo_rel_err": dpo_err},
        "failures": failures,
        "ref_losses": [m["loss"] for m in rm], "sp_losses": [m["loss"] for m in sm],
        "ref_grad_norms": [m["grad_norm"] for m in rm], "sp_grad_norms": [m["grad_norm"] for m in sm],
    }


def case_fields(case: Case) -> dict:
    return {"name": case.name, "stage": case.stage, "pref_loss": case.pref_loss if case.stage == "dpo" else None,
            "method": case.method, "sp": case.sp, "dp": case.dp, "ga": case.ga, "dtype": case.dtype,
            "packing": case.packing, "model": case.model, "steps": case.steps, "zero": case.zero}


def run_reference(case: Case, device: str = "cpu") -> dict:
    trainer = Trainer(case.train_config(sp_on=False, device=device))
    metrics = trainer.train(capture_grads=True)
    return {"metrics": metrics, "grads": {k: v.double() for k, v in trainer.step0_grads.items()}}


def run_cases(cases: list[Case], backend: str = "gloo", timeout: float = 600, log=print, fault: str | None = None,
              pools: dict[int, RankPool] | None = None, refs: dict[str, dict] | None = None) -> list[dict]:
    """Run every case (grouped by world size, one rank pool each); crashes become error results.

    `fault` injects a FAULTS.md bug into the SP ranks only; the reference stays clean.
    `pools` (world → RankPool) and `refs` (reference cache) may be shared between calls.
    """
    results: dict[str, dict] = {}
    refs = {} if refs is None else refs
    device = "cpu" if backend == "gloo" else "cuda"  # nccl / gloo-cuda ranks hold CUDA tensors
    torch.set_num_threads(2)
    for world in sorted({c.world for c in cases}):
        group = [c for c in cases if c.world == world]
        owned = pools is None or world not in pools
        pool = RankPool(world, backend=backend, timeout=timeout) if owned else pools[world]
        with pool if owned else contextlib.nullcontext():
            for c in group:
                t0 = time.perf_counter()
                try:
                    ref_cfg = c.train_config(sp_on=False, device=device)
                    key = repr(sorted(ref_cfg.to_dict().items()))
                    if key not in refs:
                        refs[key] = run_reference(c, device)
                    sp_cfg = c.train_config(sp_on=True, device=device).to_dict()
                    sp_out = pool.run(train_on_rank, sp_cfg, not c.zero, None, fault)[0]
                    res = compare(c, refs[key], sp_out)
                except RankError as e:
                    res = {**case_fields(c), "passed": False, "error": str(e).splitlines()[0] + " (see stderr)",
                           "failures": [], "ref_losses": [], "sp_losses": [], "ref_grad_norms": [], "sp_grad_norms": [],
                           "metrics": {}, "tolerance": TOLERANCES[c.dtype]}
                    print(str(e), file=sys.stderr)
                res["wall_s"] = round(time.perf_counter() - t0, 3)
                results[c.name] = res
                verdict = "PASS" if res["passed"] else ("ERROR" if res["error"] else "FAIL")
                m = res["metrics"]
                log(f"[{len(results):>3}/{len(cases)}] {verdict:<5} {c.name:<40} loss {m.get('max_loss_rel_err', float('nan')):.1e}"
                    f"  grad {max(x for x in (m.get('max_grad_norm_rel_err'), m.get('max_param_grad_rel_err'), 0.0) if x is not None):.1e}"
                    f"  ({res['wall_s']:.1f} s)")
                for f in res["failures"] + ([res["error"]] if res["error"] else []):
                    log(f"        {f}")
    return [results[c.name] for c in cases]


def register(subs) -> None:
    p = subs.add_parser("parity", help="SP on vs off: loss, grad-norm, per-parameter grads, DPO quantities",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ci", help="suite name in suites/ or a .toml path (default ci)")
    p.add_argument("--list", action="store_true", help="list the suite's cases and exit")
    p.add_argument("--stage", choices=["sft", "dpo"], help="single ad-hoc case instead of a suite")
    p.add_argument("--pref-loss", default="sigmoid", help="ad-hoc dpo loss (default sigmoid)")
    p.add_argument("--method", default="zigzag", help="ad-hoc SP method (default zigzag)")
    p.add_argument("--sp", type=int, default=2, help="ad-hoc SP size (default 2)")
    p.add_argument("--dtype", default="float64", help="ad-hoc dtype (default float64)")
    p.add_argument("--steps", type=int, default=3, help="ad-hoc optimizer steps (default 3)")
    p.add_argument("--model", default="tiny", help="ad-hoc model preset or checkpoint dir (default tiny)")
    p.add_argument("--out", default="reports/parity", help="results JSON, report.md and plots go here")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl", "gloo-cuda"], help="process-group backend")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a case's ranks are killed")
    p.add_argument("--json", action="store_true", help="print the results JSON path as a JSON line last")
    p.add_argument("--noise-floor", metavar="DTYPE", help="instead: measure the gap between two SP-off runs that "
                   "differ only in reduction order (batch 1 × accum 4 vs batch 2 × accum 2) and write it to --out")
    p.set_defaults(func=run)


def noise_floor(dtype: str, steps: int = 3, model: str = "tiny") -> dict:
    """Relative loss / grad-norm gaps between two SP-off runs of the same global batch that differ only
    in how the batch is split (so only in reduction order): the floor a dtype's tolerance must clear."""
    base = {"model_name_or_path": model, "dtype": dtype, "cutoff_len": 48, "max_samples": 16, "max_steps": steps,
            "learning_rate": 1e-3, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    a = Trainer(from_dict({**base, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4})).train()
    b = Trainer(from_dict({**base, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})).train()
    return {"dtype": dtype, "model": model, "device": base["device"],
            "loss_rel_gap": [rel(x["loss"], y["loss"]) for x, y in zip(a, b)],
            "grad_norm_rel_gap": [rel(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b)]}


def run(args) -> int:
    import json

    from .report import render

    if args.noise_floor:
        if args.noise_floor not in TOLERANCES:
            raise UsageError(f"--noise-floor {args.noise_floor!r}: choose from {', '.join(TOLERANCES)}")
        t0 = time.perf_counter()
        doc = noise_floor(args.noise_floor, args.steps, args.model)
        doc["provenance"] = provenance(" ".join(["spbench", *sys.argv[1:]]), "none", 1, 0, time.perf_counter() - t0)
        path = Path(args.out) / f"noise-floor-{args.noise_floor}-{doc['device']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, doc)
        print(f"noise floor {args.noise_floor} on {doc['device']}: loss gaps {doc['loss_rel_gap']}, "
              f"grad-norm gaps {doc['grad_norm_rel_gap']} → {path}")
        return 0
    if args.stage:
        suite = "adhoc"
        cases = expand({"stage": args.stage, "pref_loss": args.pref_loss if args.stage == "dpo" else None,
                        "method": args.method, "sp": args.sp, "dtype": args.dtype, "steps": args.steps,
                        "model": args.model, "config": {"cutoff_len": 64, "max_samples": 16, "learning_rate": 1e-3}})
    else:
        suite, cases = load_suite(args.suite)
    for c in cases:  # validate every config before spawning anything
        if c.dtype not in TOLERANCES:
            raise UsageError(f"case {c.name}: dtype {c.dtype!r} has no tolerance; use one of {', '.join(TOLERANCES)}")
        c.train_config(True), c.train_config(False)
    if args.list:
        for c in cases:
            print(f"{c.name:<44} {c.stage:<4} {c.method:<9} sp={c.sp} dp={c.dp} ga={c.ga} {c.dtype} "
                  f"packing={c.packing} zero={c.zero}")
        return 0
    t0 = time.perf_counter()
    print(f"parity: suite {suite}, {len(cases)} cases, backend {args.backend}", flush=True)
    results = run_cases(cases, args.backend, args.timeout)
    wall = time.perf_counter() - t0
    prov = provenance(" ".join(["spbench", *sys.argv[1:]]), args.backend, max(c.world for c in cases), 0, wall)
    doc = results_doc(suite, results, prov)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}.json"
    write_json_atomic(path, doc)
    report = render([path], out)
    n_pass = sum(r["passed"] for r in results)
    print(f"parity: {n_pass}/{len(results)} cases passed in {wall:.1f} s; results {path}, report {report}")
    if args.json:
        print(json.dumps({"results": str(path), "report": str(report), "passed": doc["passed"]}))
    return 0 if doc["passed"] else 1
