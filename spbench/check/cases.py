"""Parity cases: what one SP-on vs SP-off comparison runs, and suites of them (TOML, spbench/suites/).

A suite lists cases under [[cases]] with [defaults] for all of them; list-valued fields expand to the cross
product and the varying values are appended to the case name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from runtime.config import TrainConfig, from_dict

from ..common.deepspeed import check_offload, parse_offload
from ..common.errors import UsageError
from ..common.suites import read_suite

CASE_KEYS = {"name", "stage", "pref_loss", "method", "sp", "dp", "ga", "dtype", "packing", "model", "steps", "zero",
             "offload", "config"}


@dataclass
class Case:
    """One parity case: the SP run's layout and the training it runs (`config`: any train key)."""

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
    offload: str = "none"
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_offload(self.zero, parse_offload(self.offload))
        except ValueError as e:
            raise UsageError(f"case {self.name}: {e}") from None

    @property
    def world(self) -> int:
        return self.sp * self.dp

    def train_config(self, sp_on: bool, device: str = "cpu", deepspeed=None) -> TrainConfig:
        """The SP run's config, or (sp_on=False) the reference: SP 1, DP 1, grad accum dp × ga, plain torch.

        `deepspeed(zero, offload) -> path` gives the DeepSpeed config file of a ZeRO case
        (common.deepspeed.deepspeed_files) unless the case's config names one itself."""
        values = {"model_name_or_path": self.model, "stage": self.stage, "dtype": self.dtype, "packing": self.packing,
                  "max_steps": self.steps, "device": device, **self.config}
        if self.pref_loss:
            values["pref_loss"] = self.pref_loss
        if sp_on:
            values.update(sequence_parallel_size=self.sp, sequence_parallel_mode=self.method,
                          gradient_accumulation_steps=self.ga)
            if self.zero and "deepspeed" not in values:
                if deepspeed is None:
                    raise ValueError(f"case {self.name} runs ZeRO {self.zero}: pass deepspeed= to write its config")
                values["deepspeed"] = deepspeed(self.zero, parse_offload(self.offload))
        else:  # plain torch, and with packing the runtime's masked kernel: the path SP runs is not its own oracle
            values.update(gradient_accumulation_steps=self.ga * self.dp)
            values.pop("deepspeed", None)
            values.pop("attention_kernel", None)
        return from_dict(values, source=f"case {self.name}")

    def fields(self) -> dict:
        """The case's identity as results files record it (schema spbench.results/1)."""
        return {"name": self.name, "stage": self.stage, "pref_loss": self.pref_loss if self.stage == "dpo" else None,
                "method": self.method, "sp": self.sp, "dp": self.dp, "ga": self.ga, "dtype": self.dtype,
                "packing": self.packing, "model": self.model, "steps": self.steps, "zero": self.zero,
                "offload": self.offload}


def load_suite(name: str) -> tuple[str, list[Case]]:
    """(suite name, expanded cases) of a shipped parity suite (ci, full, faults) or a .toml path."""
    source, data = read_suite(name, "parity", exclude_prefix=("maxlen", "mutants"))  # other kinds of TOML
    defaults = data.get("defaults", {})
    entries = data.get("cases", [])
    if not isinstance(defaults, dict) or not isinstance(entries, list):
        raise UsageError(f"{source}: [defaults] must be a table and [[cases]] an array of tables")
    cases: list[Case] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("config", {}), dict):
            raise UsageError(f"{source}: case {i} must be a table ([[cases]] with key = value lines)")
        spec = {**defaults, **entry, "config": {**defaults.get("config", {}), **entry.get("config", {})}}
        unknown = set(spec) - CASE_KEYS
        if unknown:
            raise UsageError(f"{source}: case {i}: unknown field(s) {sorted(unknown)}; known: {sorted(CASE_KEYS)}")
        cases += expand(spec)
    if not cases:
        raise UsageError(f"{source}: no cases; add [[cases]] tables (spbench/suites/ci.toml shows the format)")
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UsageError(f"{source}: duplicate case names {sorted(dupes)}; give the cases distinct 'name' prefixes")
    return data.get("suite", {}).get("name", name.removesuffix(".toml").rsplit("/", 1)[-1]), cases


def expand(spec: dict) -> list[Case]:
    """Cross product of list-valued fields; names get the varying values appended."""
    axes = {k: v for k, v in spec.items() if isinstance(v, list)}
    out = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        fields = {**spec, **dict(zip(axes, combo))}
        prefix = fields.pop("name", None)
        parts = [fields.get("stage"), fields.get("pref_loss"), fields.get("method"), f"sp{fields.get('sp')}"]
        parts += [f"{k}{fields[k]}" for k in axes if k not in ("stage", "pref_loss", "method", "sp")]
        auto = "-".join(str(x) for x in parts if x)
        fields["name"] = f"{prefix}-{auto}" if prefix else auto
        try:
            out.append(Case(**fields))
        except TypeError as e:
            raise UsageError(f"case {fields['name']}: {e}") from None
    return out


def select(cases: list[Case], names: str) -> list[Case]:
    """The cases named in the comma-separated `names` (in suite order); UsageError naming unknown ones."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name for c in cases}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise UsageError(f"--case {names!r}: no such case(s) {unknown}; `spbench parity --list` shows them")
    return [c for c in cases if c.name in wanted]
