"""How PEFT builds the same layer as each spec, and where each spec tensor lives in PEFT.

These mappings belong to the PEFT backend, not to the specs (a spec is the paper's math alone). They are read by
harness.backends.peft (attach, tensors), harness.differential (PEFT as the reference) and tools (cost, review).
This module imports neither peft nor impl, so its readers work without PEFT installed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

TRANSFORMS = ("id", "T", "row", "col", "scalar1")


@dataclass(frozen=True)
class PeftMap:
    """How a spec's layer is built in PEFT and how the spec's tensors map onto PEFT's.

    config: the name of a PEFT config class exported by `peft` (any class works: the backend looks it up with
      getattr(peft, config) and passes it the kwargs below, the target module names, `feedforward_modules` when
      the class has that field and `fan_in_fan_out` for Conv1D layers when it has that one; a field the installed
      release lacks makes the variant n/a with the reason). The tensors are read from the PEFT tuner layer's own
      state dict, so the layer must be a BaseTunerLayer whose tensors are keyed `<name>.default[.weight]`.
    kwargs: the spec's config (`Backend.spec_config`) -> PEFT config kwargs (r, lora_alpha, use_rslora, ...).
    tensors: spec tensor name -> (PEFT state-dict key suffix without the adapter name, transform), transform one
      of "id", "T" (transpose), "row" (PEFT holds it as (1, n)), "col" ((n, 1)), "scalar1" ((1,)).
    feedforward: the PEFT target is a feed-forward (input-side IA3) module.
    compare: for a counterpart that shares only the init (other tensors than the spec's): `tensors` then names
      PEFT's tensors, and compare(ours, peft, cfg) -> {quantity: (ours, PEFT's, sign-free dim or None)} says what
      to compare after init (harness.differential.reference_init); every other property is not applicable to it.
    calibration: the data reference_init gives data-driven inits: "gapped" (a declared spectral gap) or
      "isotropic" (second moment proportional to I, where CorDA's orientation reduces to the plain SVD).
    input_dropout: False when PEFT's config has no field for the spec's adapter-input dropout (the `dropout`
      capability is then unsupported: a dropout the kwargs cannot pass is neither honoured nor refused by PEFT).
    older: the mappings of older releases that name the method (its config class) and its tensors otherwise,
      newest first. The backend takes the first of this mapping and its `older` ones that the installed release
      can build: its config class is exported and has every field of `requires` (harness.backends.peft.
      release_map); when none is, the variant is n/a naming the release and this mapping's class (and the older
      names it was looked up under). Only a pure renaming belongs here: the same math under other names.
    requires: config fields that only the releases shipping this mapping's method have, when earlier releases
      export the same config class for another method (OFT before 0.16); a release whose class lacks one of them
      makes the variant n/a with `earlier` as the reason.
    earlier: what the releases whose config class lacks `requires` ship under that class (the n/a reason).
    deviations_since: property -> the first release with the behaviour the spec's declared PEFT deviation on that
      property describes; on an older release the declaration does not apply and the property is judged as is
      (a declared size would otherwise turn the older release's exact result into a failure).
    """

    config: str
    kwargs: Callable[[Any], dict]
    tensors: Mapping[str, tuple[str, str]]
    feedforward: bool = False
    notes: str = ""
    compare: Callable[..., dict] | None = None
    calibration: str = "gapped"
    input_dropout: bool = True  # False: PEFT's config has no adapter-input dropout field (the capability is n/a)
    older: tuple["PeftMap", ...] = ()
    requires: tuple[str, ...] = ()
    earlier: str = ""
    deviations_since: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BnbPath:
    """A bitsandbytes code path some PEFT releases take that the running environment cannot serve (or that PEFT
    itself refuses), decided by probing the installed release's source, never by catching its error at run time.

    layers: the bitsandbytes layer kinds ("bnb4", "bnb8") the path serves.
    source: where the release's code is probed: "tuner" (every module of the package of the mapping's config
      class, e.g. peft/tuners/lora/) or "module:Qualname" (one function or class, e.g.
      "peft.tuners.lora.bnb:Linear4bit").
    marker: a regular expression (multi-line) of the code taking the path; a release has the path when it matches.
    lacks: what the path needs that the environment may lack: a key of the backend's environment probe
      ("MatmulLtState.memory_efficient_backward": bitsandbytes has that attribute; "cuda": torch sees a GPU);
      "" for PEFT's own explicit refusal (then the path is always n/a).
    when: a PEFT config kwarg that must be true for the path to be taken ("use_dora"); "" for every config.
    why: the n/a reason, formatted with {release} (PEFT's version), {site} (peft/<file>:<line> of the match) and
      {bnb} (bitsandbytes' version).
    """

    layers: tuple[str, ...]
    source: str
    marker: str
    lacks: str
    why: str
    when: str = ""


# Measured (bitsandbytes wheels from the registry, the harness's layers on a CPU-only machine, torch 2.13.0):
# 0.42.0, 0.43.3 and 0.44.1 have MatmulLtState.memory_efficient_backward but run neither Linear8bitLt nor
# Linear4bit on CPU ("Torch not compiled with CUDA enabled" / "quantization state not initialized"); 0.45.0 drops
# the attribute and still runs neither; 0.50.2 runs both. No bitsandbytes release serves these paths on CPU, so a
# per-release bitsandbytes pin cannot help.
_NO_BNB = ("no bitsandbytes release has it and runs on CPU (0.44.1, the last with it, runs neither Linear8bitLt nor "
           "Linear4bit without CUDA; bitsandbytes {bnb} lacks it)")
BNB_PATHS: tuple[BnbPath, ...] = (
    BnbPath(("bnb4",), "peft.tuners.lora.bnb:Linear4bit", r"does not support DoRA yet", "",
            "peft {release} refuses DoRA on a bitsandbytes Linear4bit ({site}: 'does not support DoRA yet')",
            when="use_dora"),
    BnbPath(("bnb8",), "peft.tuners.lora.bnb:Linear8bitLt", r"does not support DoRA yet", "",
            "peft {release} refuses DoRA on a bitsandbytes Linear8bitLt ({site}: 'does not support DoRA yet')",
            when="use_dora"),
    BnbPath(("bnb8",), "tuner", r"state\.memory_efficient_backward", "MatmulLtState.memory_efficient_backward",
            "peft {release}'s Linear8bitLt path reads bitsandbytes' MatmulLtState.memory_efficient_backward "
            "({site}), gone from bitsandbytes since 0.45.0; " + _NO_BNB),
    BnbPath(("bnb4", "bnb8"), "peft.utils.integrations:dequantize_bnb_weight",
            r'if is_cpu:\s*\n\s*weight = weight\.to\(torch\.device\("cuda"\)\)', "cuda",
            "peft {release}'s DoRA dequantizes a bitsandbytes weight on CUDA, a CPU weight moved there unconditionally "
            "({site}), and this machine has no CUDA", when="use_dora"),
)


def bnb_na(paths, layer: str, kwargs: Mapping[str, Any], source: Callable[[str], Iterable[tuple[str, int, str]]],
           has: Mapping[str, bool], release: str, bnb: str) -> str | None:
    """Why PEFT `release` cannot run the `layer` kind of bitsandbytes layer here: the first of `paths` for that
    layer whose `when` kwarg is set, whose code the release has and whose need the environment lacks; None when
    none is. source(where) -> the code probed, as (file as peft/<path>, its first line number, text) pieces (none
    when the release lacks it); has: the environment probe (BnbPath.lacks keys)."""
    for p in paths:
        if layer not in p.layers or (p.when and not kwargs.get(p.when)):
            continue
        if p.lacks and has.get(p.lacks, False):
            continue
        for file, first, text in source(p.source):
            m = re.search(p.marker, text)
            if m is not None:
                line = first + text.count("\n", 0, m.end())
                return p.why.format(release=release, site=f"{file}:{line}", bnb=bnb)
    return None


def corda_compare(ours, peft, cfg):
    """Against PEFT's CorDA (IPM) on data whose second moment is proportional to I, where both orientations reduce
    to W's plain top-r SVD: the same U (B's unit columns), the same rows of P up to a common scale (A's unit rows),
    the same rank-r part U S P = s B A, and the same residual."""
    s = cfg.alpha / cfg.r

    def unit(M, dim):
        return M / M.norm(dim=dim, keepdim=True)

    return {
        "U": (ours["U"], unit(peft["B"], 0), 1),
        "P, unit rows": (unit(ours["P"], 1), unit(peft["A"], 1), 0),
        "U S P": ((ours["U"] * ours["S"]) @ ours["P"], s * peft["B"] @ peft["A"], None),
        "base_weight": (ours["base_weight"], peft["base_weight"], None),
    }


# What PEFT before 0.16 ships as OFTConfig: other tensors than the spec's Q, so no mapping (n/a naming the release).
_EARLIER_OFT = ("the earlier OFT (0.9-0.13: full b × b blocks oft_r rotating the output side, b = d_out / r; "
                "0.14-0.15: full blocks oft_r on the input side and a trainable output scale oft_s), with no "
                "counterpart of the spec's Q (the blocks' strict upper triangles, OFTRotationModule since 0.16)")

_LORA_AB = {"A": ("lora_A.weight", "id"), "B": ("lora_B.weight", "id")}

# variant name -> its PEFT mapping. The zoo registers its mutants here under their own names while they run.
MAPS: dict[str, PeftMap] = {
    "lora": PeftMap(
        config="LoraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": cfg.dropout},
        tensors=_LORA_AB,
    ),
    "pissa": PeftMap(
        config="LoraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
                            "lora_dropout": cfg.dropout, "init_lora_weights": "pissa"},
        tensors=_LORA_AB,
        notes="PEFT also overwrites the base weight with W_res; compare against get_base_layer().weight.",
    ),
    "dora": PeftMap(
        config="LoraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
                            "lora_dropout": cfg.dropout, "use_dora": True},
        tensors={**_LORA_AB, "m": ("lora_magnitude_vector", "id")},
        notes="PEFT's state-dict key for m has no '.weight' suffix; perturb m, or the DoRA path equals plain LoRA.",
    ),
    "eva": PeftMap(
        config="LoraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
                            "lora_dropout": cfg.dropout, "init_lora_weights": "eva", "eva_config": {"rho": 1.0}},
        tensors=_LORA_AB,
        notes="PEFT's A comes from initialize_lora_eva_weights(model, dataloader); rho = 1.0 keeps the rank "
              "uniform, as ours.",
    ),
    "delora": PeftMap(
        config="DeloraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "delora_lambda": cfg.lambda0, "module_dropout": cfg.dropout},
        tensors={"A": ("delora_A", "id"), "B": ("delora_B", "id"), "lam": ("delora_lambda", "id"),
                 "wnorm": ("delora_w_norm", "id")},
        notes="PEFT's module_dropout is element-wise dropout on the adapter input; delora_w_norm is a persistent buffer.",
    ),
    "hra": PeftMap(
        config="HRAConfig",
        kwargs=lambda cfg: {"r": cfg.r, "apply_GS": False, "init_weights": True},
        tensors={"U": ("hra_u", "T")},
        notes="PEFT's hra_u is (d_in, r) with the vectors as columns; ours are the rows of U (r, d_in).",
    ),
    "ia3": PeftMap(
        config="IA3Config",
        kwargs=lambda cfg: {"init_ia3_weights": True, "feedforward_modules": []},
        tensors={"g": ("ia3_l", "col")},
        feedforward=False,
        notes="PEFT stores the gate as ia3_l of shape (d_out, 1); the target must not be listed in "
              "feedforward_modules.",
    ),
    "ia3_ff": PeftMap(
        config="IA3Config",
        kwargs=lambda cfg: {"init_ia3_weights": True},
        tensors={"g": ("ia3_l", "row")},
        feedforward=True,
        notes="PEFT stores the gate as ia3_l of shape (1, d_in); the target must be listed in both "
              "target_modules and feedforward_modules.",
    ),
    # ---- issue 29, specs without an impl variant (specs helper 1): vera, loha, lokr, adalora
    "vera": PeftMap(
        config="VeraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial,
                            "projection_prng_key": 0, "save_projection": True, "init_weights": True},
        tensors={"A": ("vera_A", "id"), "B": ("vera_B", "id"), "d": ("vera_lambda_d", "id"),
                 "b": ("vera_lambda_b", "id")},
        notes="PEFT's vera_A / vera_B are one model-wide BufferDict pair, sized to the largest targeted layer and "
              "sliced per layer; on a single layer they are the layer's exact (r, d_in) / (d_out, r).",
    ),
    "loha": PeftMap(
        config="LoHaConfig",
        input_dropout=False,
        kwargs=lambda cfg: {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                            "init_weights": True},
        tensors={"B1": ("hada_w1_a", "id"), "A1": ("hada_w1_b", "id"), "B2": ("hada_w2_a", "id"),
                 "A2": ("hada_w2_b", "id")},
        notes="PEFT's hada_w{i}_a is (d_out, r) and hada_w{i}_b is (r, d_in): the spec's B_i, A_i.",
    ),
    "lokr": PeftMap(
        config="LoKrConfig",
        input_dropout=False,
        kwargs=lambda cfg: {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                            "decompose_both": cfg.decompose_both, "decompose_factor": -1, "init_weights": True},
        tensors={"W1": ("lokr_w1", "id"), "W1a": ("lokr_w1_a", "id"), "W1b": ("lokr_w1_b", "id"),
                 "W2": ("lokr_w2", "id"), "W2a": ("lokr_w2_a", "id"), "W2b": ("lokr_w2_b", "id")},
        notes="Which of W1 / W1a,W1b and W2 / W2a,W2b exist depends on r and the layer's shape (the spec's `when`).",
    ),
    "adalora": PeftMap(
        config="AdaLoraConfig",
        kwargs=lambda cfg: {"init_r": cfg.r, "target_r": cfg.r, "lora_alpha": cfg.alpha,
                            "lora_dropout": cfg.dropout, "total_step": 100, "init_lora_weights": True},
        tensors={"P": ("lora_B", "id"), "E": ("lora_E", "col"), "Q": ("lora_A", "id")},
        notes="PEFT's AdaLoRA takes the rank as init_r (its `r` is ignored); lora_E is (r, 1). total_step is "
              "required by the config and only drives the rank allocator (out of scope).",
    ),
    "antipasto_corda": PeftMap(
        config="LoraConfig",
        kwargs=lambda cfg: {"r": cfg.r, "lora_alpha": cfg.alpha, "init_lora_weights": "corda",
                            "corda_config": {"corda_method": "ipm"}},
        tensors=_LORA_AB,
        compare=corda_compare,
        calibration="isotropic",
        notes="PEFT's CorDA puts the factors in trainable LoRA A/B (ours: frozen U, S, P and a trainable gain), so "
              "only the init is compared, on data with C ∝ I (reference_init).",
    ),
    # ---- issue #29 (specs without an impl variant): OFT, BOFT, FourierFT, MiSS and its Bone mode
    "oft": PeftMap(
        config="OFTConfig",
        kwargs=lambda cfg: {"r": cfg.r, "oft_block_size": 0, "use_cayley_neumann": False, "module_dropout": 0.0,
                            "coft": False, "block_share": False, "init_weights": True},
        tensors={"Q": ("oft_R.weight", "id")},
        notes="PEFT's r is the number of blocks (oft_block_size = 0 derives the block size); the exact Cayley "
              "transform is selected (PEFT's default is its Cayley–Neumann series).",
        requires=("use_cayley_neumann",),
        earlier=_EARLIER_OFT,
    ),
    "oft_neumann": PeftMap(
        config="OFTConfig",
        kwargs=lambda cfg: {"r": cfg.r, "oft_block_size": 0, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5,
                            "module_dropout": 0.0, "coft": False, "block_share": False, "init_weights": True},
        tensors={"Q": ("oft_R.weight", "id")},
        notes="PEFT's default OFT: the Cayley–Neumann series with its default 5 terms (I + S + S² + S³ in (I − S)⁻¹).",
        requires=("use_cayley_neumann", "num_cayley_neumann_terms"),
        earlier=_EARLIER_OFT,
    ),
    "boft": PeftMap(
        config="BOFTConfig",
        kwargs=lambda cfg: {"boft_block_num": cfg.r, "boft_block_size": 0, "boft_n_butterfly_factor": 1,
                            "boft_dropout": 0.0, "init_weights": True},
        tensors={"R": ("boft_R", "id"), "s": ("boft_s", "id")},
        notes="One butterfly factor (plain block-diagonal); PEFT forces that anyway without its CUDA extension.",
    ),
    "fourierft": PeftMap(
        config="FourierFTConfig",
        kwargs=lambda cfg: {"n_frequency": cfg.n_frequency, "scaling": cfg.scaling,
                            "random_loc_seed": cfg.loc_seed, "init_weights": True},
        tensors={"c": ("fourierft_spectrum", "id")},
        notes="init_weights=True: a zero spectrum (PEFT's default draws it from N(0, 1), not the identity).",
        # the float32 spectrum (spectrum.float() in get_delta_weight) came in 0.16.0; 0.12.0-0.15.2 build it in
        # the spectrum's own dtype (tuners/fourierft/layer.py:89 in 0.15.2), exact on a float64 layer
        deviations_since={p: "0.16.0" for p in ("oracle", "dense_equivalence", "model_oracle")},
    ),
    "miss": PeftMap(
        config="MissConfig",
        kwargs=lambda cfg: {"r": cfg.r, "miss_dropout": cfg.dropout, "init_weights": True},
        tensors={"D": ("miss_block", "id")},
        older=(PeftMap(config="BoneConfig", input_dropout=False, kwargs=lambda cfg: {"r": cfg.r, "init_weights": True},
                       tensors={"D": ("bone_block", "id")},
                       notes="Before MiSS (peft 0.14-0.16): BoneConfig(init_weights=True), the same layer with "
                             "bone_block for miss_block and no dropout field."),),
    ),
    "bone": PeftMap(
        config="MissConfig",
        kwargs=lambda cfg: {"r": cfg.r, "init_weights": "bat"},
        tensors={"B": ("miss_block", "id")},
        notes="PEFT 0.21.2 ships Bone as MiSS's init_weights='bat' mode.",
        older=(PeftMap(config="BoneConfig", kwargs=lambda cfg: {"r": cfg.r, "init_weights": "bat"},
                       tensors={"B": ("bone_block", "id")},
                       notes="Before MiSS (peft 0.14-0.16): BoneConfig(init_weights='bat'), bone_block."),),
    ),
}


def peft_map(spec) -> PeftMap | None:
    """The PEFT mapping of a spec (by its variant name), None when PEFT has no counterpart."""
    return MAPS.get(spec.name)
