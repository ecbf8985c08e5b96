"""Typed configuration: YAML file + Megatron-style command-line flags (flags win).

Layout of a YAML file (every key optional; defaults below)::

    model:
      arch: joint_decoder            # an arch of the registry (megatron_vlm/archs/)
      backend: auto                  # auto | local | te
      vision: {name, num_layers, hidden_size, num_attention_heads, ffn_hidden_size, image_size,
               patch_size, hidden_dropout, attention_dropout}   # one encoder, or a list of them
      language: {num_layers, hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size,
                 vocab_size, seq_length, rotary_base, rope_scaling_factor,
                 activation, hidden_dropout, attention_dropout} # dropout: 0.0 by default;
                                                 # activation: silu | gelu | gelu_pytorch_tanh | gelu_new
      <arch section>: {...}          # owned and validated by its arch, e.g.
      cross_attention: {every: 4, layers: null, text_rows_without_image: zero}
      projector: mlp                 # mlp | affine
      freeze_vision: false
      freeze_projector: false
      freeze_language: false
    parallel: {tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size,
               context_parallel_size, sequence_parallel, virtual_pipeline_model_parallel_size}
    training: {micro_batch_size, global_batch_size, train_iters, lr, calculate_per_token_loss, ...}
    data: {data_path, tokenizer_path, num_threads, images_per_sample}

``validate(cfg, world_size)`` checks every constraint before a model is built and raises
:class:`ConfigError` with one line naming the field, the value and what is allowed. The core rules
are here; each arch adds its own (``ArchSpec.validate``) and owns its config section.

``training.calculate_per_token_loss`` (default true; ``--no-calculate-per-token-loss`` turns it
off): the loss is the mean over every loss token of the global batch (all micro batches and
data-parallel ranks), as megatron-core computes it with ``calculate_per_token_loss``; off, it is
the mean of the per-micro-batch means.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A bad configuration value. The message is one line: field, value, what is allowed."""


@dataclass
class VisionConfig:
    name: str = "vision"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    image_size: int = 32
    patch_size: int = 8
    add_class_token: bool = True
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # a transformers vision tower used as is instead of megatron's CLIP ViT (its HF config dict,
    # e.g. Mllama's 'mllama_vision_model'); see megatron_vlm/models/hf_vision.py
    hf_config: dict | None = None
    # Mllama tiling: 1 = one centre-cropped image_size tile per image; N > 1 = up to N tiles of
    # image_size px per image, as Llama-3.2-Vision's processor (needs the wrapped Mllama tower with
    # max_num_tiles = N; see megatron_vlm/data/tiling.py)
    max_tiles: int = 1
    # several encoders (model.vision is a list): exactly one is the generalist (cross_attn queries,
    # weighted_average's token grid); freeze: null = model.freeze_vision
    generalist: bool = False
    freeze: bool | None = None

    @property
    def patches_per_side(self) -> int:
        """Patch grid side: the patch-embedding convolution (stride = patch_size) floors, so an
        image_size that is not a multiple (SigLIP 384 px / 14 px -> 27) leaves its last
        ``image_size % patch_size`` rows and columns unused, as HF CLIP/SigLIP do."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def seq_length(self) -> int:
        return self.num_patches + (1 if self.add_class_token else 0)


@dataclass
class LanguageConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None = multi-head attention
    ffn_hidden_size: int = 128
    vocab_size: int = 512
    seq_length: int = 64
    rotary_base: float = 10000.0
    # Llama-3.x RoPE scaling factor (megatron-core's: low/high frequency factors 1 and 4, original
    # context 8192, as in Llama 3.1/3.2); None = plain RoPE
    rope_scaling_factor: float | None = None
    layernorm_epsilon: float = 1e-5
    # activation of the gated MLP (HF hidden_act): silu (SwiGLU), gelu / gelu_pytorch_tanh / gelu_new (GeGLU)
    activation: str = "silu"
    hidden_dropout: float = 0.0       # Megatron-LM's --hidden-dropout (its default is 0.1; ours 0.0)
    attention_dropout: float = 0.0    # --attention-dropout
    untie_embeddings_and_output_weights: bool = True
    unpadded_vocab_size: int | None = None  # true vocab when vocab_size is padded (HF export trims to it)


FUSION_METHODS = ("sequence_append", "weighted_average", "cross_attn")
FUSION_ROUTERS = ("learned", "data")
FUSION_SPACES = ("projected", "vision")


@dataclass
class FusionConfig:
    """How several vision encoders' tokens become one image's tokens (``model.fusion``; unused with
    one encoder). See ``megatron_vlm/models/fusion.py``.

    * ``method``: ``sequence_append`` (every encoder's tokens one after another), ``weighted_average``
      (per-image weights over the encoders, tokens pooled to the generalist's grid) or ``cross_attn``
      (generalist tokens attend to the router-weighted specialists; tanh gate initialised to 0).
    * ``router``: ``learned`` (MLP on the pooled generalist features, softmax over the encoders —
      over the specialists for cross_attn) or ``data`` (per-sample weights from the manifest);
      unused by sequence_append. ``top_k``: learned router keeps the k best specialists (null = all).
    * ``space``: ``projected`` (each encoder has its own projector to the language width, fusion in
      that width: any encoder widths) or ``vision`` (fusion in the encoders' common width, then one
      shared projector: every encoder needs the same hidden_size).
    """
    method: str = "sequence_append"
    router: str = "learned"
    top_k: int | None = None
    heads: int = 4
    router_hidden_size: int = 64
    space: str = "projected"


def _arch_sections() -> dict[str, type]:
    """``{section name: config class}`` of the registered archs (imported on first use)."""
    from megatron_vlm.archs import config_sections

    return config_sections()


@dataclass
class ModelConfig:
    """``vision`` is a list of encoders (YAML: one mapping or a list). Arch sections
    (``model.<section>``) are not fields: every registered arch with a section has one here,
    reachable as an attribute (``cfg.model.cross_attention.every``) and kept in ``sections``."""
    arch: str = "joint_decoder"
    backend: str = "auto"
    vision: list[VisionConfig] = field(default_factory=lambda: [VisionConfig()],
                                       metadata={"list_of": VisionConfig})
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    projector: str = "mlp"            # megatron MultimodalProjector type: mlp | affine
    drop_vision_class_token: bool = True
    freeze_vision: bool = False       # the vision encoder
    freeze_projector: bool = False    # the vision -> language projector
    freeze_language: bool = False     # the language decoder (cross-attention layers included)
    image_token_id: int | None = None  # None: the tokenizer's image token (vocab_size - 1 if no tokenizer)
    sections: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name, cls in _arch_sections().items():
            self.sections.setdefault(name, cls())

    def __getattr__(self, name):  # only called when normal lookup fails: the arch sections
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"ModelConfig has no field or arch section {name!r}")

    def __setattr__(self, name, value):
        if name not in {f.name for f in dataclasses.fields(self)} and name in _arch_sections():
            self.sections[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def vision_encoder(self) -> VisionConfig:
        """The one vision encoder (for code paths that take exactly one; see ``generalist``)."""
        if len(self.vision) != 1:
            raise ConfigError(f"model.vision: {len(self.vision)} encoders; this needs exactly one")
        return self.vision[0]

    @property
    def multi_encoder(self) -> bool:
        return len(self.vision) > 1

    @property
    def generalist(self) -> VisionConfig:
        """The generalist encoder: the one marked ``generalist`` (the only one if there is one)."""
        if len(self.vision) == 1:
            return self.vision[0]
        marked = [v for v in self.vision if v.generalist]
        if len(marked) != 1:
            raise ConfigError(f"model.vision: {len(marked)} encoders marked generalist "
                              f"({[v.name for v in marked]}); mark exactly one")
        return marked[0]

    @property
    def generalist_index(self) -> int:
        return self.vision.index(self.generalist) if self.multi_encoder else 0

    def encoder_frozen(self, v: VisionConfig) -> bool:
        """Whether encoder ``v`` is frozen: its own ``freeze``, else ``freeze_vision``."""
        return v.freeze if v.freeze is not None else self.freeze_vision

    def encoder_image_tokens(self, v: VisionConfig) -> int:
        """Tokens encoder ``v`` gives per image (its patch grid, + class token if kept)."""
        return v.num_patches + (0 if self.drop_vision_class_token or not v.add_class_token else 1)

    @property
    def num_image_tokens(self) -> int:
        """Decoder positions one image occupies (``inline`` token layout): the one encoder's tokens;
        several: the sum over encoders (``sequence_append``) or the generalist's (otherwise)."""
        if self.multi_encoder and self.fusion.method == "sequence_append":
            return sum(self.encoder_image_tokens(v) for v in self.vision)
        return self.encoder_image_tokens(self.generalist)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    fp8_format: str | None = None     # e4m3 | hybrid (Transformer Engine on GPU)
    fp8_recipe: str = "delayed"       # delayed | tensorwise | mxfp8 | blockwise
    use_distributed_optimizer: bool = True
    calculate_per_token_loss: bool = True  # loss = mean over all loss tokens of the global batch
    # activation recompute of the language decoder (Megatron-LM's flags): full | selective | None
    recompute_granularity: str | None = None
    recompute_method: str | None = None      # full: uniform | block (default uniform)
    recompute_num_layers: int | None = None  # full: layers per recomputed chunk (uniform) / first N (block); default 1
    recompute_modules: str | None = None     # selective: comma-separated, e.g. "core_attn,moe" (default core_attn)
    save: str | None = None
    load: str | None = None
    finetune: bool = False            # --load weights only: iteration 0, fresh optimizer/scheduler/data/RNG
    load_optim: bool = True           # --no-load-optim: fresh optimizer and LR scheduler
    load_rng: bool = True             # --no-load-rng: fresh RNG streams
    save_interval: int | None = None
    keep_last: int | None = None      # checkpoints kept in --save (newest first); None or 0 = all
    eval_interval: int | None = None
    eval_iters: int = 4
    log_interval: int = 1
    log_dir: str | None = None
    max_bad_steps: int = 5
    peak_tflops: float | None = None


@dataclass
class DataConfig:
    data_path: str | None = None
    tokenizer_path: str | None = None
    num_threads: int = 2
    images_per_sample: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        """Plain dict as in YAML: arch sections sit in ``model`` beside the fields."""
        d = dataclasses.asdict(self)
        d["model"].update(d["model"].pop("sections"))
        return d


BACKENDS = ("auto", "local", "te")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
PROJECTORS = ("mlp", "affine")
# gated-MLP activations of the language decoder (HF hidden_act names; gelu_new = tanh-approximated GELU)
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Float fields accept ints and numeric strings: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    if str(f.type).startswith("float") and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}={value!r}: must be a number") from None
    return value


def _build(cls, data: dict | None, where: str):
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}
    sections = _arch_sections() if cls is ModelConfig else {}
    unknown = sorted(set(data) - set(known) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(set(known) | set(sections))}")
    kwargs = {}
    for name, value in data.items():
        if name in sections:
            kwargs.setdefault("sections", {})[name] = _build(sections[name], value, f"{where}.{name}")
            continue
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if "list_of" in f.metadata:  # one mapping or a list of them
            items = value if isinstance(value, list) else [value]
            if not items:
                raise ConfigError(f"{where}.{name}: an empty list; give at least one")
            kwargs[name] = [_build(f.metadata["list_of"], v, f"{where}.{name}" + (f".{i}" if len(items) > 1 else ""))
                            for i, v in enumerate(items)]
        elif sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            value = _coerce(f, value, f"{where}.{name}")
            kwargs[name] = tuple(value) if isinstance(f.default, tuple) and isinstance(value, list) else value
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    return _build(Config, data, "config")


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config {where}: invalid YAML ({problem})") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"--config {path}: cannot be read as UTF-8 YAML ({type(e).__name__})") from None
    return from_dict(data)


# Megatron-LM flag name -> (section, field). Flags not listed map by name to the first section
# that has the field (e.g. --num-layers is not one: language and vision both have it).
FLAG_MAP: dict[str, tuple[str, ...]] = {
    "arch": ("model", "arch"),
    "num_layers": ("model", "language", "num_layers"),
    "hidden_size": ("model", "language", "hidden_size"),
    "num_attention_heads": ("model", "language", "num_attention_heads"),
    "num_query_groups": ("model", "language", "num_query_groups"),
    "ffn_hidden_size": ("model", "language", "ffn_hidden_size"),
    "seq_length": ("model", "language", "seq_length"),
    "vocab_size": ("model", "language", "vocab_size"),
    "tensor_model_parallel_size": ("parallel", "tensor_model_parallel_size"),
    "pipeline_model_parallel_size": ("parallel", "pipeline_model_parallel_size"),
    "num_virtual_stages_per_pipeline_rank": ("parallel", "virtual_pipeline_model_parallel_size"),
    "expert_model_parallel_size": ("parallel", "expert_model_parallel_size"),
    "context_parallel_size": ("parallel", "context_parallel_size"),
    "sequence_parallel": ("parallel", "sequence_parallel"),
    "hidden_dropout": ("model", "language", "hidden_dropout"),
    "attention_dropout": ("model", "language", "attention_dropout"),
    "freeze_vision": ("model", "freeze_vision"),
    "freeze_projector": ("model", "freeze_projector"),
    "freeze_language": ("model", "freeze_language"),
    "transformer_impl": ("model", "backend"),
    "data_path": ("data", "data_path"),
    "tokenizer_path": ("data", "tokenizer_path"),
}
for _f in dataclasses.fields(TrainingConfig):
    FLAG_MAP.setdefault(_f.name, ("training", _f.name))

# --help text of every flag (a flag without one fails tests/unit/test_bad_inputs.py); the allowed
# values of choice flags are shown as their metavar ({a,b}) and checked by validate()
FLAG_HELP: dict[str, str] = {
    "arch": "model arch (model.arch)",
    "num_layers": "language decoder layers",
    "hidden_size": "language decoder hidden size",
    "num_attention_heads": "language decoder attention heads",
    "num_query_groups": "key/value heads of the language decoder (GQA; default: = heads)",
    "ffn_hidden_size": "language decoder MLP hidden size",
    "seq_length": "decoder sequence length in tokens (image tokens included)",
    "vocab_size": "vocabulary size (raised to the tokenizer's, padded to a multiple of 128)",
    "tensor_model_parallel_size": "tensor-parallel ranks",
    "pipeline_model_parallel_size": "pipeline stages",
    "num_virtual_stages_per_pipeline_rank": "virtual pipeline stages per rank (interleaved schedule)",
    "expert_model_parallel_size": "expert-parallel ranks (archs with experts)",
    "context_parallel_size": "context-parallel ranks",
    "sequence_parallel": "sequence parallelism (needs --tensor-model-parallel-size > 1)",
    "hidden_dropout": "dropout after attention/MLP of the language decoder, in [0, 1)",
    "attention_dropout": "attention dropout of the language decoder, in [0, 1)",
    "freeze_vision": "do not train the vision encoder",
    "freeze_projector": "do not train the vision -> language projector",
    "freeze_language": "do not train the language decoder (cross-attention layers included)",
    "transformer_impl": "layer backend (auto: te when Transformer Engine imports and CUDA is present)",
    "data_path": "dataset folder with train/ and val/ shards, or 'mock' (random data)",
    "tokenizer_path": "HF tokenizer folder (default: DATA/tokenizer)",
    "micro_batch_size": "samples per micro batch per data-parallel rank",
    "global_batch_size": "samples per iteration over all data-parallel ranks",
    "train_iters": "iteration to train to",
    "lr": "peak learning rate (> 0)",
    "min_lr": "learning rate at the end of the decay, in [0, --lr]",
    "lr_warmup_iters": "linear warmup iterations (>= 0)",
    "lr_decay_style": "learning-rate decay after the warmup",
    "lr_decay_iters": "iterations of warmup + decay (default: --train-iters)",
    "weight_decay": "Adam weight decay (>= 0)",
    "adam_beta1": "Adam beta1, in [0, 1)",
    "adam_beta2": "Adam beta2, in [0, 1)",
    "clip_grad": "gradient-norm clipping (0 = off)",
    "seed": "random seed, in [0, 2^32)",
    "bf16": "bf16 mixed precision",
    "fp8_format": "FP8 format (Transformer Engine on GPU)",
    "fp8_recipe": "FP8 scaling recipe",
    "use_distributed_optimizer": "shard the optimizer state over data-parallel ranks (default on)",
    "calculate_per_token_loss": "loss = mean over all loss tokens of the global batch (default on)",
    "recompute_granularity": "activation recompute of the language decoder",
    "recompute_method": "full recompute: how layers are grouped",
    "recompute_num_layers": "full recompute: layers per group (uniform) or first N layers (block)",
    "recompute_modules": "selective recompute: comma-separated modules (core_attn, mlp, moe, moe_act, layernorm)",
    "save": "checkpoint folder to write (pass the same folder to --load to resume automatically)",
    "load": "checkpoint folder to resume from (its 'latest' iteration)",
    "finetune": "with --load: load the weights only; start at iteration 0 with a fresh optimizer, "
                "LR schedule, data position and RNG",
    "load_optim": "load the optimizer and LR scheduler state with --load (default on)",
    "load_rng": "load the RNG state with --load (default on)",
    "save_interval": "save every N iterations (>= 1; default: only at the end)",
    "keep_last": "keep the newest N checkpoints in --save (0 = keep all); the one just written is never removed",
    "eval_interval": "evaluate every N iterations (>= 1; default: never)",
    "eval_iters": "iterations per evaluation (>= 1)",
    "log_interval": "log every N iterations (>= 1)",
    "log_dir": "folder for metrics.jsonl and TensorBoard events",
    "max_bad_steps": "NaN/Inf losses in a row before stopping (>= 1)",
    "peak_tflops": "peak TFLOP/s per device for MFU (default: known GPUs; none on CPU)",
}
NO_FLAG_HELP = {"use_distributed_optimizer": "replicate the optimizer state on every data-parallel rank",
                "calculate_per_token_loss": "average the loss per micro batch instead of per token",
                "load_optim": "with --load: fresh optimizer and LR scheduler (weights, iteration, data kept)",
                "load_rng": "with --load: fresh RNG state"}


def flag_choices(name: str) -> tuple[str, ...] | None:
    """Allowed values of a choice flag (shown in --help; validate() enforces them)."""
    if name == "arch":
        from megatron_vlm.archs import registered_archs

        return tuple(sorted(registered_archs()))
    return {"transformer_impl": BACKENDS, "lr_decay_style": LR_DECAY_STYLES, "fp8_format": FP8_FORMATS,
            "fp8_recipe": FP8_RECIPES, "recompute_granularity": RECOMPUTE_GRANULARITIES,
            "recompute_method": RECOMPUTE_METHODS}.get(name)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-style flags. Every flag defaults to None = 'keep the YAML/default value'."""
    parser.add_argument("--config", type=str, default=None, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set model.vision.num_layers=4")
    for name, path in FLAG_MAP.items():
        flag = "--" + name.replace("_", "-")
        t = str(_field(path).type)  # the type of the config field the flag sets
        if t == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=FLAG_HELP.get(name))
            continue
        conv = int if t.startswith("int") else float if t.startswith("float") else str
        choices = flag_choices(name)
        parser.add_argument(flag, type=conv, default=None, help=FLAG_HELP.get(name),
                            metavar="{" + ",".join(choices) + "}" if choices else None)
    for name, text in NO_FLAG_HELP.items():
        parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", default=None,
                            help=text)
    return parser


def _field(path: Sequence[str]) -> dataclasses.Field:
    """The dataclass field at ``path`` (e.g. ``("model", "language", "num_layers")``)."""
    cls, f = Config, None
    for part in path:
        f = {x.name: x for x in dataclasses.fields(cls)}[part]
        cls = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return f


def _step(obj, part: str, where: str, source: str):
    """``obj.part`` while walking a dotted key; a list of sections is indexed by number, and a
    list of one is stepped through (``model.vision.image_size`` = that of the one encoder)."""
    if isinstance(obj, list):
        if part.isdigit():
            if int(part) >= len(obj):
                raise ConfigError(f"{source}: {where} has {len(obj)} entries, no index {part}")
            return obj[int(part)], True
        if len(obj) != 1:
            raise ConfigError(f"{source}: {where} holds {len(obj)} entries: index one, e.g. {where}.0.{part}")
        return obj[0], False
    if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
        raise ConfigError(f"{source}: unknown config section {part!r}")
    return getattr(obj, part), True


def _keys(obj) -> dict:
    """Settable keys of a config section: its fields (and, for the model, the arch sections)."""
    keys = {f.name: f for f in dataclasses.fields(obj) if f.name != "sections"}
    return keys | dict.fromkeys(obj.sections) if isinstance(obj, ModelConfig) else keys


def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value) or (isinstance(value, list) and value
                                               and dataclasses.is_dataclass(value[0]))


def _set_path(cfg: Config, path: Sequence[str], value: Any, source: str) -> None:
    obj, parts, done = cfg, list(path), []
    while len(parts) > 1 or isinstance(obj, list):
        obj, consumed = _step(obj, parts[0], ".".join(done) or "config", source)
        if consumed:
            done.append(parts.pop(0))
    known = _keys(obj) if dataclasses.is_dataclass(obj) else {}
    name = ".".join(path)
    if parts[0] not in known:
        raise ConfigError(f"{source}: unknown config key {name!r}")
    current = getattr(obj, parts[0])
    if _is_section(current):
        section = current[0] if isinstance(current, list) else current
        raise ConfigError(f"{source}: {name!r} is a config section; set one of its keys "
                          f"({sorted(_keys(section))})")
    setattr(obj, parts[0], _coerce(known[parts[0]], value, f"{source}: {name}"))


def set_key(cfg: Config, key: str, value: Any, source: str | None = None) -> None:
    """Set a dotted config key (``model.vision.image_size``) as ``--set`` does; ConfigError if bad."""
    _set_path(cfg, key.split("."), value, source or f"--set {key}={value}")


def from_args(args: argparse.Namespace) -> Config:
    """Config from ``--config`` (or defaults), then flags, then ``--set KEY=VALUE`` overrides."""
    cfg = load_yaml(args.config) if args.config is not None else Config()
    for name, path in FLAG_MAP.items():
        value = getattr(args, name, None)
        if value is not None:
            _set_path(cfg, path, value, "--" + name.replace("_", "-"))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.vision.num_layers=4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or 'parse error'})") from None
        _set_path(cfg, key.split("."), value, f"--set {item}")
    return cfg


def parse(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    parser = add_arguments(parser or argparse.ArgumentParser())
    return from_args(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name}={value!r}: must be a positive integer")


def _encoders(m: ModelConfig) -> list[tuple[str, VisionConfig]]:
    """(config path, encoder): ``model.vision`` for a single encoder, ``model.vision.i`` else."""
    if len(m.vision) == 1:
        return [("model.vision", m.vision[0])]
    return [(f"model.vision.{i}", v) for i, v in enumerate(m.vision)]


def _dropout(name: str, value) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
             f"{name}={value!r}: must be a probability in [0, 1)")


def _check_arch(m: ModelConfig):
    from megatron_vlm.archs import get_arch, registered_archs

    names = sorted(registered_archs())
    _require(m.arch in names, f"model.arch={m.arch!r}: allowed {names}")
    return get_arch(m.arch)


def _check_fp8(cfg: Config, machine: bool) -> None:
    """FP8 needs Transformer Engine layers: the one place this rule lives (``machine``: also that
    this machine has them)."""
    t, m = cfg.training, cfg.model
    _require(t.fp8_format is None or t.fp8_format in FP8_FORMATS,
             f"training.fp8_format={t.fp8_format!r}: allowed {list(FP8_FORMATS)} (GPU with Transformer Engine)")
    _require(t.fp8_recipe in FP8_RECIPES, f"training.fp8_recipe={t.fp8_recipe!r}: allowed {list(FP8_RECIPES)}")
    if t.fp8_format is None:
        return
    _require(m.backend != "local",
             f"training.fp8_format={t.fp8_format!r}: needs model.backend 'te' or 'auto' (Transformer Engine), not 'local'")
    if not machine:
        return
    from megatron_vlm.models.backends import te_available

    _require(te_available(), f"--fp8-format {t.fp8_format}: needs Transformer Engine on a CUDA device "
                             f"(model.backend {m.backend!r} resolves to 'local' here)")


def recompute_modules(t: TrainingConfig) -> list[str]:
    return [m.strip() for m in (t.recompute_modules or "core_attn").split(",") if m.strip()]


def _divisors(value: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(value, limit) + 1) if value % d == 0]


def _tp_divisible(field: str, value: int, tp: int, what: str) -> None:
    """One line when megatron-core cannot split ``field`` over ``tp`` ranks: the field, its value,
    TP, what megatron splits, and the allowed values (nearest multiples; TP sizes that divide it)."""
    if value % tp == 0:
        return
    lower, upper = value // tp * tp, (value // tp + 1) * tp
    near = f"{lower} or {upper}" if lower else f"{upper}"
    raise ConfigError(f"{field}={value}: must be divisible by parallel.tensor_model_parallel_size={tp} "
                      f"(megatron-core splits {what} over the TP ranks); allowed: a multiple of {tp} "
                      f"(e.g. {near}), or a tensor_model_parallel_size in {_divisors(value)}")


def _check_tensor_parallel_sizes(cfg: Config, encoders: list[tuple[str, VisionConfig]], groups: int) -> None:
    """Every size megatron-core 0.16 divides by TP (``divide()`` asserts in its tensor-parallel
    layers, sequence-parallel scatters), checked before building:

    * language decoder: attention heads and query groups (``SelfAttention``; megatron-core would
      replicate KV heads when TP is a multiple of the groups, but the cross-attention, MoT and MMCA
      layers split them, so the groups must be divisible by TP), ``ffn_hidden_size``
      (``linear_fc1`` column- and ``linear_fc2`` row-parallel; MoE experts use the same width with
      expert TP = TP), ``vocab_size`` (``VocabParallelEmbedding`` / output layer); the projector's
      widths (``language.hidden_size``) and cross-attention heads / KV heads are these same numbers
      (``hidden_size`` = heads x head dim is then divisible too);
    * each megatron vision encoder (CLIP ViT): heads and ``ffn_hidden_size``; wrapped HF towers
      (``hf_config``) are replicated, not split;
    * sequence parallelism: ``seq_length`` (split over TP along the sequence; per context-parallel
      chunk with CP, whose chunks need ``seq_length`` divisible by 2 x CP).
    Pipeline (layers per stage, virtual stages) and expert (experts per EP rank) sizes are checked
    beside them in :func:`validate` and the arch rules."""
    p, lang = cfg.parallel, cfg.model.language
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    for section, v in encoders:
        if v.hf_config is not None:
            continue
        _tp_divisible(f"{section}.num_attention_heads", v.num_attention_heads, tp, "the vision attention heads")
        _tp_divisible(f"{section}.ffn_hidden_size", v.ffn_hidden_size, tp, "the vision MLP")
    _tp_divisible("model.language.num_attention_heads", lang.num_attention_heads, tp, "the attention heads")
    _tp_divisible("model.language.num_query_groups", groups, tp, "the key/value heads")
    _tp_divisible("model.language.ffn_hidden_size", lang.ffn_hidden_size, tp, "the MLP and expert widths")
    _tp_divisible("model.language.vocab_size", lang.vocab_size, tp, "the embedding and output rows")
    if cp > 1:
        _require(lang.seq_length % (2 * cp) == 0,
                 f"model.language.seq_length={lang.seq_length}: must be divisible by 2 x "
                 f"parallel.context_parallel_size={cp} (megatron-core's load-balanced context-parallel "
                 f"chunks); allowed: a multiple of {2 * cp}")
    if p.sequence_parallel and tp > 1:
        per_rank = lang.seq_length // cp
        _require(per_rank % tp == 0,
                 f"model.language.seq_length={lang.seq_length}: must be divisible by "
                 f"parallel.tensor_model_parallel_size={tp}" + (f" x context_parallel_size={cp}" if cp > 1 else "")
                 + f" with sequence_parallel (megatron-core splits the sequence over the TP ranks); "
                 f"allowed: a multiple of {tp * cp}")


def usable_encoder_name(name) -> bool:
    """A name that can key the model's ``nn.ModuleDict`` of encoders (several encoders): an
    identifier that is no ModuleDict attribute (``keys``, ``training``, ...)."""
    import torch

    return isinstance(name, str) and name.isidentifier() and name not in set(dir(torch.nn.ModuleDict()))


def _check_encoder_list(m: ModelConfig, encoders: list[tuple[str, VisionConfig]]) -> None:
    """Several encoders (``model.vision`` a list; fused by ``model.fusion``): names usable as
    module keys, exactly one generalist, no tiled / Mllama towers; the fusion settings' choices."""
    f = m.fusion
    _require(f.method in FUSION_METHODS, f"model.fusion.method={f.method!r}: allowed {list(FUSION_METHODS)}")
    _require(f.router in FUSION_ROUTERS, f"model.fusion.router={f.router!r}: allowed {list(FUSION_ROUTERS)}")
    _require(f.space in FUSION_SPACES, f"model.fusion.space={f.space!r}: allowed {list(FUSION_SPACES)}")
    for section, v in encoders:
        _require(isinstance(v.generalist, bool), f"{section}.generalist={v.generalist!r}: must be true or false")
        _require(v.freeze is None or isinstance(v.freeze, bool),
                 f"{section}.freeze={v.freeze!r}: must be true, false or null (= model.freeze_vision)")
    if len(encoders) == 1:
        return
    for section, v in encoders:
        _require(usable_encoder_name(v.name),
                 f"{section}.name={v.name!r}: with several encoders each name must be a Python identifier "
                 f"(letters, digits, _, no digit first) and no torch ModuleDict attribute (e.g. 'keys', 'training')")
        _require(v.max_tiles == 1 and (v.hf_config or {}).get("model_type") != "mllama_vision_model",
                 f"{section} ({v.name}): a tiled / Mllama vision tower cannot be fused with other encoders "
                 f"(max_tiles={v.max_tiles}); use it as the only encoder")
    marked = [v.name for _, v in encoders if v.generalist]
    _require(len(marked) == 1, "model.vision: no encoder is marked generalist; mark exactly one (generalist: true)"
             if not marked else f"model.vision: {len(marked)} encoders marked generalist {marked}; mark exactly one")


def encoder_width(v: VisionConfig) -> int:
    """Width of encoder ``v``'s output features (a wrapped HF tower's own output size)."""
    if v.hf_config is not None:
        return int(v.hf_config.get("vision_output_dim", v.hf_config.get("hidden_size", v.hidden_size)))
    return v.hidden_size


def _check_fusion(cfg: Config, encoders: list[tuple[str, VisionConfig]]) -> None:
    """Fusion sizes (several encoders): top_k, cross_attn heads vs the fusion width and TP, the
    router's width, common widths for ``space: vision``, class tokens for weighted_average."""
    m, f = cfg.model, cfg.model.fusion
    if len(encoders) == 1:
        return
    specialists = len(encoders) - 1
    if f.top_k is not None:
        _require(f.method != "sequence_append" and f.router == "learned",
                 f"model.fusion.top_k={f.top_k}: only for the learned router of weighted_average / cross_attn "
                 f"(method={f.method!r}, router={f.router!r}); use null")
        _require(isinstance(f.top_k, int) and not isinstance(f.top_k, bool) and 1 <= f.top_k <= specialists,
                 f"model.fusion.top_k={f.top_k!r}: must be an integer in [1, {specialists}] (the specialists), or null = all")
    if f.method != "sequence_append" and f.router == "learned":
        _positive("model.fusion.router_hidden_size", f.router_hidden_size)
    widths = [(v.name, encoder_width(v)) for _, v in encoders]
    if f.space == "vision":
        _require(len({w for _, w in widths}) == 1,
                 "model.vision: encoders whose widths cannot be fused with model.fusion.space=vision: "
                 + ", ".join(f"{n} ({w})" for n, w in widths)
                 + "; give them one hidden_size, or use space: projected (a projector per encoder)")
    width = m.language.hidden_size if f.space == "projected" else widths[0][1]
    where = "model.language.hidden_size" if f.space == "projected" else "the encoders' hidden_size"
    if f.method == "cross_attn":
        _positive("model.fusion.heads", f.heads)
        _require(width % f.heads == 0, f"model.fusion.heads={f.heads}: must divide the fusion width "
                                       f"{width} ({where}, fusion.space={f.space})")
        _tp_divisible("model.fusion.heads", f.heads, cfg.parallel.tensor_model_parallel_size,
                      "the fusion's cross-attention heads")
    if f.method == "weighted_average" and not m.drop_vision_class_token:
        kept = {v.name: v.add_class_token for _, v in encoders}
        _require(len(set(kept.values())) == 1,
                 f"model.vision add_class_token {kept}: weighted_average with drop_vision_class_token=false "
                 f"needs every encoder to keep a class token or none; set drop_vision_class_token: true")


def _check_recompute(t: TrainingConfig, layers_per_stage: int) -> None:
    g = t.recompute_granularity
    _require(g is None or g in RECOMPUTE_GRANULARITIES,
             f"training.recompute_granularity={g!r}: allowed {list(RECOMPUTE_GRANULARITIES)} (or null)")
    if g is None:
        _require(t.recompute_method is None and t.recompute_num_layers is None and t.recompute_modules is None,
                 "training.recompute_method/num_layers/modules: set training.recompute_granularity (full | selective) too")
        return
    if g == "full":
        _require(t.recompute_method is None or t.recompute_method in RECOMPUTE_METHODS,
                 f"training.recompute_method={t.recompute_method!r}: allowed {list(RECOMPUTE_METHODS)}")
        n = t.recompute_num_layers
        if n is not None:
            _positive("training.recompute_num_layers", n)
            _require(n <= layers_per_stage, f"training.recompute_num_layers={n}: at most the "
                                            f"{layers_per_stage} decoder layers of a pipeline stage")
        _require(t.recompute_modules is None, "training.recompute_modules: only with recompute_granularity=selective")
    else:
        _require(t.recompute_method is None and t.recompute_num_layers is None,
                 "training.recompute_method/num_layers: only with recompute_granularity=full")
        bad = [m for m in recompute_modules(t) if m not in RECOMPUTE_MODULES]
        _require(not bad, f"training.recompute_modules={t.recompute_modules!r}: allowed (comma-separated) "
                          f"{list(RECOMPUTE_MODULES)}")


def _number(name: str, value, lo: float | None = None, hi: float | None = None, hi_open: bool = False,
            lo_open: bool = False, allowed: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    _require(ok, f"{name}={value!r}: must be {allowed}")


def _check_training_ranges(cfg: Config) -> None:
    """Ranges of the optimisation, checkpoint and logging settings (one line each)."""
    t, m = cfg.training, cfg.model
    _number("training.lr", t.lr, 0, lo_open=True, allowed="a number > 0")
    _number("training.min_lr", t.min_lr, 0, t.lr, allowed=f"a number in [0, training.lr={t.lr}]")
    _number("training.weight_decay", t.weight_decay, 0, allowed="a number >= 0")
    _number("training.clip_grad", t.clip_grad, 0, allowed="a number >= 0 (0 = no clipping)")
    for name in ("adam_beta1", "adam_beta2"):
        _number(f"training.{name}", getattr(t, name), 0, 1, hi_open=True, allowed="a number in [0, 1)")
    _require(isinstance(t.seed, int) and not isinstance(t.seed, bool) and 0 <= t.seed < 2 ** 32,
             f"training.seed={t.seed!r}: must be an integer in [0, 2^32)")
    _require(isinstance(t.lr_warmup_iters, int) and not isinstance(t.lr_warmup_iters, bool)
             and t.lr_warmup_iters >= 0, f"training.lr_warmup_iters={t.lr_warmup_iters!r}: must be an integer >= 0")
    for name in ("lr_decay_iters", "save_interval", "eval_interval"):
        if getattr(t, name) is not None:
            _positive(f"training.{name}", getattr(t, name))
    for name in ("eval_iters", "log_interval", "max_bad_steps"):
        _positive(f"training.{name}", getattr(t, name))
    if t.keep_last is not None:
        _require(isinstance(t.keep_last, int) and not isinstance(t.keep_last, bool) and t.keep_last >= 0,
                 f"training.keep_last={t.keep_last!r}: must be an integer >= 1 (checkpoints kept), or 0 = keep all")
    if t.peak_tflops is not None:
        _number("training.peak_tflops", t.peak_tflops, 0, lo_open=True, allowed="a number > 0 (TFLOP/s per device)")
    for name in ("save", "load", "log_dir"):
        value = getattr(t, name)
        _require(value is None or (isinstance(value, str) and value.strip() != ""),
                 f"training.{name}={value!r}: must be a folder path")
    _require(not (t.finetune and not t.load), "training.finetune=True (--finetune): needs --load (the checkpoint to start from)")
    every_encoder_frozen = all(m.encoder_frozen(v) for v in m.vision)
    _require(not (every_encoder_frozen and m.freeze_projector and m.freeze_language),
             "model.freeze_vision (or every encoder's freeze), freeze_projector and freeze_language are all true: "
             "nothing would train; unfreeze at least one part")


def validate(cfg: Config, world_size: int | None = None, machine: bool = False) -> Config:
    """Check every cross-field constraint; raise ConfigError (one line) on the first violation.
    The core rules are here; the arch's own come from its ``ArchSpec.validate``. ``machine``: also
    what this machine must have (Transformer Engine + CUDA for ``backend: te`` and FP8), as the
    launcher checks before building; without it a GPU config validates on any machine."""
    m, lang, p, t = cfg.model, cfg.model.language, cfg.parallel, cfg.training
    arch = _check_arch(m)
    _require(m.backend in BACKENDS, f"model.backend={m.backend!r}: allowed {list(BACKENDS)}")
    if m.backend == "te" and machine:
        from megatron_vlm.models.backends import te_available

        _require(te_available(), "model.backend='te': needs Transformer Engine and a CUDA device; use 'local' or 'auto'")
    _require(m.projector in PROJECTORS, f"model.projector={m.projector!r}: allowed {list(PROJECTORS)}")
    encoders = _encoders(m)
    names = [v.name for _, v in encoders]
    _require(len(set(names)) == len(names), f"model.vision names {names}: must be distinct")
    _check_encoder_list(m, encoders)
    for section, obj in encoders + [("model.language", lang)]:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            _positive(f"{section}.{name}", getattr(obj, name))
        for name in ("hidden_dropout", "attention_dropout"):
            _dropout(f"{section}.{name}", getattr(obj, name))
    for name in ("vocab_size", "seq_length"):
        _positive(f"model.language.{name}", getattr(lang, name))
    if lang.unpadded_vocab_size is not None:
        _require(0 < lang.unpadded_vocab_size <= lang.vocab_size,
                 f"model.language.unpadded_vocab_size={lang.unpadded_vocab_size}: must be in [1, vocab_size={lang.vocab_size}]")
    for section, v in encoders:
        for name in ("image_size", "patch_size"):
            _positive(f"{section}.{name}", getattr(v, name))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "context_parallel_size"):
        _positive(f"parallel.{name}", getattr(p, name))
    for name in ("micro_batch_size", "global_batch_size", "train_iters"):
        _positive(f"training.{name}", getattr(t, name))

    for section, v in encoders:
        _require(v.image_size >= v.patch_size,
                 f"{section}.image_size={v.image_size}: must be at least {section}.patch_size={v.patch_size} "
                 f"(the patch grid is image_size // patch_size per side)")
        _positive(f"{section}.max_tiles", v.max_tiles)
        if v.max_tiles > 1:
            from megatron_vlm.data.tiling import tiling_problem

            problem = tiling_problem(section, v, arch.token_layout.value)
            _require(problem is None, str(problem))
    for section, obj in encoders + [("model.language", lang)]:
        _require(obj.hidden_size % obj.num_attention_heads == 0,
                 f"{section}.hidden_size={obj.hidden_size}: must be divisible by "
                 f"{section}.num_attention_heads={obj.num_attention_heads}")
    _require(lang.activation in GATED_ACTIVATIONS,
             f"model.language.activation={lang.activation!r}: allowed {list(GATED_ACTIVATIONS)} (gated MLP)")
    if lang.rope_scaling_factor is not None:
        _require(isinstance(lang.rope_scaling_factor, (int, float)) and lang.rope_scaling_factor > 0,
                 f"model.language.rope_scaling_factor={lang.rope_scaling_factor!r}: must be a number > 0 (or null)")
    groups = lang.num_query_groups if lang.num_query_groups is not None else lang.num_attention_heads
    _positive("model.language.num_query_groups", groups)
    _require(lang.num_attention_heads % groups == 0,
             f"model.language.num_query_groups={groups}: must divide "
             f"model.language.num_attention_heads={lang.num_attention_heads}")

    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _check_fusion(cfg, encoders)
    _check_tensor_parallel_sizes(cfg, encoders, groups)
    _require(lang.num_layers % pp == 0,
             f"model.language.num_layers={lang.num_layers}: must be divisible by parallel.pipeline_model_parallel_size={pp}")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        _positive("parallel.virtual_pipeline_model_parallel_size", vpp)
        _require(pp > 1, f"parallel.virtual_pipeline_model_parallel_size={vpp}: needs pipeline_model_parallel_size > 1")
        _require(lang.num_layers % (pp * vpp) == 0,
                 f"model.language.num_layers={lang.num_layers}: must be divisible by pipeline x virtual stages = {pp * vpp}")
    if p.sequence_parallel:
        _require(tp > 1, "parallel.sequence_parallel=True: needs tensor_model_parallel_size > 1")
    ep = p.expert_model_parallel_size
    if ep > 1:
        _require(arch.experts, f"parallel.expert_model_parallel_size={ep}: only archs with experts take it "
                               f"(arch={m.arch!r} has none)")
    if m.image_token_id is not None:
        _require(0 <= m.image_token_id < lang.vocab_size,
                 f"model.image_token_id={m.image_token_id}: must be in [0, vocab_size={lang.vocab_size})")
    n, per_image = cfg.data.images_per_sample, arch.token_layout.positions_per_image(m)
    _require(per_image * n < lang.seq_length,
             f"model.language.seq_length={lang.seq_length}: must exceed the {per_image} image "
             f"tokens x {n} images per sample ({arch.token_layout.value} token layout)")
    arch.validate(cfg)
    _require(t.lr_decay_style in LR_DECAY_STYLES,
             f"training.lr_decay_style={t.lr_decay_style!r}: allowed {list(LR_DECAY_STYLES)}")
    _check_fp8(cfg, machine)
    _check_recompute(t, lang.num_layers // pp)
    _require(isinstance(t.lr, (int, float)) and not isinstance(t.lr, bool) and t.lr > 0,
             f"training.lr={t.lr!r}: must be a number > 0")
    _check_training_ranges(cfg)

    if world_size is not None:
        mp = tp * pp * p.context_parallel_size
        _require(world_size % mp == 0,
                 f"world size {world_size}: must be divisible by tensor x pipeline x context parallel = {mp}")
        dp = world_size // mp
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"training.global_batch_size={t.global_batch_size}: must be divisible by "
                 f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        if ep > 1:
            _require((world_size // pp) % ep == 0,
                     f"parallel.expert_model_parallel_size={ep}: must divide world size / pipeline size = {world_size // pp}")
            # experts are split over expert-TP (= TP) x EP ranks within each pipeline stage
            _require((world_size // pp) % (tp * ep) == 0,
                     f"parallel.expert_model_parallel_size={ep}: tensor x expert parallel = {tp * ep} must divide "
                     f"world size / pipeline size = {world_size // pp}")
    return cfg
