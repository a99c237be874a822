"""What a run times: the names each filter accepts, ``make bench``'s representative set and
``--full``'s everything. Every filter applies to both sections (the whole model, the attention
alone): a section keeps the names it has, and a section left with none is skipped. A dtype of
``make bench`` may be narrowed to some configurations and workloads (``REPRESENTATIVE``)."""
from dataclasses import dataclass, field

from attention_bench import ATTENTION_IMPLS, ATTENTION_SHAPES, ATTENTION_WORKLOADS
from configs import CONFIGS, WORKLOADS
from workloads import IMPLS

BEST = "best"  # the fastest backend that runs on the device (model: cpp, else triton on CUDA, else torch)

DTYPES = ("float32", "bfloat16", "float16")
# The model and inputs in float32, run under torch.autocast in bfloat16 (the model section only).
AUTOCAST = "autocast-bf16"


def _union(*groups):
    return tuple(dict.fromkeys(name for group in groups for name in group))


# filter -> {section: names it has there}
NAMES = {
    "configs": {"model": tuple(CONFIGS), "attention": tuple(ATTENTION_SHAPES)},
    "workloads": {"model": WORKLOADS, "attention": ATTENTION_WORKLOADS},
    "impls": {"model": IMPLS + (BEST,), "attention": ATTENTION_IMPLS + (BEST,)},
    "dtypes": {"model": DTYPES + (AUTOCAST,), "attention": DTYPES},
}

# make bench: the d2l zh book setting and the large model, every workload, against the
# reference, what a user would try instead (torch.compile) and the best backend; under
# bfloat16 autocast one representative group only, the large model's decoder (REPRESENTATIVE).
DEFAULT = {"configs": ("zh", "large"), "workloads": _union(WORKLOADS, ATTENTION_WORKLOADS),
           "impls": ("reference", "reference+compile", "hoisted+compile", BEST), "dtypes": ("float32", AUTOCAST)}
REPRESENTATIVE = {AUTOCAST: {"configs": ("large",), "workloads": ("decoder_forward",)}}
FULL = {option: _union(*sections.values()) for option, sections in NAMES.items() if option != "dtypes"}
FULL["dtypes"] = ("float32", AUTOCAST)


class SelectionError(ValueError):
    pass


def valid_names(option):
    """``option``'s valid names, one line per section (for --help and errors)."""
    sections = NAMES[option]
    if len(set(sections.values())) == 1:
        return ", ".join(next(iter(sections.values())))
    return "; ".join(f"{section}: {', '.join(names)}" for section, names in sections.items())


def parse(option, text):
    """The names in the comma-separated ``text`` for filter ``option``, matched without regard to
    case, in their canonical spelling; ``SelectionError`` names the unknown ones and the valid."""
    known = {name.lower(): name for name in _union(*NAMES[option].values())}
    requested = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in requested if name.lower() not in known]
    if unknown or not requested:
        what = f"unknown {', '.join(repr(n) for n in unknown)}" if unknown else "no name given"
        raise SelectionError(f"--{option}: {what}; valid names are {valid_names(option)}")
    return tuple(dict.fromkeys(known[name.lower()] for name in requested))


@dataclass(frozen=True)
class Selection:
    configs: tuple
    workloads: tuple
    impls: tuple
    dtypes: tuple
    narrowed: dict = field(default_factory=dict)  # {dtype: {option: names}}: the dtype runs on these only

    def for_section(self, section):
        """{option: the selected names that ``section`` has}."""
        return {option: tuple(n for n in getattr(self, option) if n in NAMES[option][section]) for option in NAMES}

    def runs(self, section):
        """{dtype: (configs, workloads)} of ``section``: its configurations and workloads for
        each of its dtypes, those of a narrowed dtype only where the narrowing names them."""
        part = self.for_section(section)
        out = {}
        for dtype in part["dtypes"]:
            only = self.narrowed.get(dtype, {})
            out[dtype] = tuple(tuple(n for n in part[o] if o not in only or n in only[o])
                               for o in ("configs", "workloads"))
        return out


def select(full=False, **texts):
    """The :class:`Selection` of the filters given as comma-separated ``texts`` (None: the
    default set, or everything when ``full``); the default dtypes come with ``REPRESENTATIVE``."""
    base = FULL if full else DEFAULT
    narrowed = {} if full or texts.get("dtypes") is not None else REPRESENTATIVE
    return Selection(**{option: base[option] if texts.get(option) is None else parse(option, texts[option])
                        for option in NAMES}, narrowed=narrowed)
