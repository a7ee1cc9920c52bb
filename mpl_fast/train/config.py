"""Run configuration: defaults, YAML presets (configs/), --set overrides, validation.

A config is a dict of sections. Presets are partial YAML files merged over DEFAULTS; unknown
keys and bad values are refused with a one-line ConfigError naming the key.
"""
import copy
import dataclasses
import math
from importlib import resources
from pathlib import Path

import yaml

from mpl_fast.data.placement import DECODE_DEVICES, DEVICES, placement
from mpl_fast.mpl.config import WEAK_MODES, WEAK_THROUGH_BATCH_NORM, MPLConfig, \
    preset as mpl_preset
from mpl_fast.train.graphed import WARMUP_STEPS as GRAPH_WARMUP_STEPS


class ConfigError(ValueError):
    """A bad configuration: the message names the key."""


_MPL_FIELDS = {f.name: None for f in dataclasses.fields(MPLConfig)}

DEFAULTS = {
    "method": "mpl",  # mpl | supervised
    "mpl": {"preset": "paper", **_MPL_FIELDS},  # null: the preset's value
    "data": {
        "name": "digits",  # digits (embedded) | image_folder (JPEG tree; needs the DALI pipeline)
        "root": None,  # image_folder: root/train + root/test (or data.test_root)
        "test_root": None,
        "image_size": None,
        "labeled_per_class": 10,
        "labeled_percent": None,  # image_folder: a class-balanced percentage instead
        "split_list": None,  # image_folder: a file of names, as in ImageNet's 1%/10% lists
        "test_fraction": 0.3,
        "split_seed": 0,
        "batch_size": 32,
        "mu": 7,
        "pad": 1,
        "hflip": False,
        "cutout": 3,
        "strong_strength": 0.5,  # digits: colour jitter + noise of the strong view
        "randaugment_n": 2,  # image_folder: RandAugment layers and level (0-10, see DALI docs)
        "randaugment_m": 9,
        "num_threads": 4,
        # image_folder feeding a GPU: where DALI decodes, and where it crops, flips, runs
        # RandAugment and cutout (gpu | cpu; augment on cpu needs decode on cpu); the batch
        # moves to the GPU before the first GPU stage. decode_device=once: small images all
        # image_size x image_size decoded once at the start into host memory (CPU)
        "decode_device": "gpu",
        "augment_device": "gpu",
        "steps_per_run": 1,  # image_folder: steps' batches made by one run of each pipeline
        "hw_decoder_load": None,  # GPU decoding: share of JPEGs to the hardware engine (0-1)
        # image_folder: pipelines making the unlabeled batch side by side, each its share from
        # a shard of the data (RandAugment's per-sample routing runs in one thread a pipeline)
        "unlabeled_pipelines": 1,
    },
    "model": {"teacher": "small_cnn", "student": "small_cnn", "bn_momentum": None,
              # Reduced MPL: teacher "reduced", an MLP over a large teacher's stored logits (the
              # folder `mpl-fast logits` writes), so that one large network is in memory
              "teacher_logits": None, "reduced_hidden": 128, "reduced_temperature": 1.0,
              "checkpoint": "none",  # activation checkpointing: none|teacher|student|both
              "checkpoint_blocks": None,  # only the first N blocks of each (null: all)
              "compile": "none"},  # torch.compile of both networks: none|default|max-autotune...
    "optim": {
        "teacher_lr": 0.05,
        "student_lr": 0.05,
        "scale_lr_by_batch": False,  # lr * batch_size / 256, as the paper's code does
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "warmup_steps": 0,
        "student_wait_steps": 0,
    },
    "train": {
        "steps": 1500,
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "log_every": 10,
        "eval_every": 250,
        "checkpoint_every": 250,
        "ema_decay": 0.995,
        "finetune_steps": 0,
        "finetune_lr": 0.01,
        "amp": "auto",  # auto (bf16 on GPU) | bf16 | off
        "channels_last": "auto",
        # true: cuDNN times its convolution algorithms for the run's shapes once and keeps the
        # fastest (torch.backends.cudnn.benchmark; false leaves torch's setting as it is)
        "cudnn_benchmark": False,
        "max_nonfinite_skips": 10,
        "eval_batch_size": 512,
        "sync_bn": False,  # under torchrun: SyncBatchNorm (GPU)
        "cuda_graph": False,  # true: the step replayed as a CUDA graph; emulate: no graph
        "profile_steps": 0,  # > 0: torch.profiler over that many steps, into DIR/profile/
        # steps before the profiled ones, counted in this session (a resumed run from its resume)
        "profile_from": 5,
    },
}

CHOICES = {
    "method": ("mpl", "supervised"),
    "data.name": ("digits", "image_folder", "cifar_batches"),
    "train.device": ("auto", "cpu", "cuda"),
    "model.checkpoint": ("none", "teacher", "student", "both"),
    "model.compile": ("none", "default", "reduce-overhead", "max-autotune",
                      "max-autotune-no-cudagraphs"),
    "train.amp": ("auto", "bf16", "off"),
    "train.channels_last": ("auto", True, False),
    "train.cuda_graph": (False, True, "emulate"),
    "mpl.teacher_weak_no_grad": (False, True) + WEAK_MODES,
    "data.decode_device": DECODE_DEVICES,
    "data.augment_device": DEVICES,
}
# Keys that say where and how a run executes, not what it learns: a checkpoint resumes, or is
# evaluated, under other values (another machine, its data copied elsewhere, no compiler, blocks
# checkpointed or not to fit another card's memory)
EXECUTION_KEYS = frozenset({
    "train.device", "train.cuda_graph", "train.channels_last", "train.cudnn_benchmark",
    "model.compile", "model.checkpoint", "model.checkpoint_blocks", "data.root",
    "data.test_root", "data.num_threads", "data.decode_device", "data.augment_device",
    "data.steps_per_run", "data.hw_decoder_load", "data.unlabeled_pipelines"})

POSITIVE = ("data.batch_size", "data.mu", "data.labeled_per_class", "train.steps",
            "train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.eval_batch_size", "train.max_nonfinite_skips", "data.steps_per_run",
            "data.unlabeled_pipelines", "model.reduced_hidden", "data.num_threads")
NON_NEGATIVE = ("optim.teacher_lr", "optim.student_lr", "optim.momentum", "optim.weight_decay",
                "optim.warmup_steps", "optim.student_wait_steps", "train.finetune_steps",
                "train.finetune_lr", "data.pad", "data.cutout", "data.strong_strength",
                "data.randaugment_n", "data.randaugment_m", "train.profile_steps",
                "train.profile_from")
# keys null by default: an example of the kind of value each takes otherwise
NULLABLE_KINDS = {"data.root": "", "data.test_root": "", "data.split_list": "",
                  "model.teacher_logits": "", "data.image_size": 0, "data.labeled_percent": 0.0,
                  "model.bn_momentum": 0.0}
DIGITS_SIDE = 8  # the embedded digits are 8 x 8: their padding (reflect) must stay below that
# numpy's global seed (and the digits split's RandomState) take 0 to 2**32 - 1
SEEDS = ("train.seed", "data.split_seed")


def preset_names():
    return sorted(p.name[:-5] for p in resources.files("mpl_fast.configs").iterdir()
                  if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: `steps: 3` and later `steps: 4` in one section trained 4 steps without a word)."""


def _mapping_without_repeats(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys it brings may repeat
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the loader's own error says so
            break
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1})",
                key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _mapping_without_repeats)


def _read_yaml(text, origin):
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config must be a mapping of sections")
    return data


def _merge(base, update, prefix=""):
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {name!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; give it a mapping")
            _merge(base[key], value, name + ".")
        else:
            base[key] = _coerce(name, base[key], value)


def _coerce(name, default, value):
    # YAML reads .nan and .inf as numbers; no setting means either (a NaN passes every range test)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if value is None and get(DEFAULTS, name) is not None:  # null is no value of its own there
        raise ConfigError(f"{name} cannot be null, it takes a value like "
                          f"{get(DEFAULTS, name)!r}")
    if default is None:  # a null default: the kind of value the key takes, where it has one
        default = NULLABLE_KINDS.get(name)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool) and not (name in CHOICES and value in CHOICES[name]):
            if name in CHOICES:  # a switch that also takes words (train.cuda_graph)
                raise ConfigError(f"{name} must be one of {list(CHOICES[name])}, got {value!r}")
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and isinstance(value, bool) and name in CHOICES:
        # YAML 1.1 reads a bare off/on as false/true; the choice meant is the word
        word = "on" if value else "off"
        if word in CHOICES[name] and value not in CHOICES[name]:
            return word
    if isinstance(default, str) and not isinstance(value, str) and not (
            name in CHOICES and value in CHOICES[name]):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def load(name_or_file="digits", overrides=()):
    """The resolved config: DEFAULTS <- preset (a name in configs/ or a YAML file) <- KEY=VALUE."""
    config = copy.deepcopy(DEFAULTS)
    path = Path(name_or_file)
    if name_or_file in preset_names():
        text = resources.files("mpl_fast.configs").joinpath(f"{name_or_file}.yaml").read_text()
        _merge(config, _read_yaml(text, f"preset {name_or_file}"))
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path}: cannot read it as UTF-8 text "
                              f"({err.__class__.__name__})") from err
        _merge(config, _read_yaml(text, str(path)))
    else:
        raise ConfigError(f"unknown config {name_or_file!r}: "
                          f"a preset ({', '.join(preset_names())}) or a YAML file")
    apply_overrides(config, overrides)
    return config


# Keys added since runs were first saved whose default is not what those runs did: a config
# saved without the key gets the value that describes how it was trained.
_SAVED_BEFORE_THE_KEY = {("mpl", "ce_old_forward"): "joint"}  # CE_old came from the joint forward


def from_saved(saved: dict) -> dict:
    """A config stored in a checkpoint or a run's config.yaml, completed with the defaults of keys
    added since (or, where a new default changed what a run does, with what it did then)."""
    config = copy.deepcopy(DEFAULTS)
    _merge(config, saved)
    for (section, key), then in _SAVED_BEFORE_THE_KEY.items():
        if key not in (saved.get(section) or {}):
            config[section][key] = then
    return config


def parse_override(item):
    """'section.key=value' -> ('section.key', value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        return key, yaml.safe_load(value) if value else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                          f"({str(err).splitlines()[0]})") from err


def apply_overrides(config, overrides):
    """Merge KEY=VALUE items into `config` (unknown keys refused), then validate it."""
    for item in overrides:
        key, update = parse_override(item)
        for part in reversed(key.split(".")):
            update = {part: update}
        _merge(config, update)
    validate(config)


# data keys that only a source read from files uses (digits is embedded)
FOLDER_ONLY = ("root", "test_root", "image_size", "labeled_percent", "split_list")


def validate(config):
    for key, allowed in CHOICES.items():
        if get(config, key) is None and get(DEFAULTS, key) is None:
            continue  # an mpl key left to its preset
        if get(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {get(config, key)!r}")
    for key in POSITIVE:
        if not get(config, key) >= 1:
            raise ConfigError(f"{key} must be >= 1, got {get(config, key)}")
    for key in NON_NEGATIVE:
        if get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(config, key)}")
    if not config["optim"]["momentum"] < 1.0:  # 1 and above: the steps never decay
        raise ConfigError(f"optim.momentum must be in [0, 1), got {config['optim']['momentum']}")
    bn_momentum = config["model"]["bn_momentum"]
    if bn_momentum is not None and not 0.0 <= bn_momentum <= 1.0:  # torch's BN: a weight
        raise ConfigError(f"model.bn_momentum must be null or in [0, 1], got {bn_momentum}")
    for key in SEEDS:
        if not 0 <= get(config, key) < 2**32:
            raise ConfigError(f"{key} must be in [0, 2**32 - 1], got {get(config, key)}")
    blocks = config["model"]["checkpoint_blocks"]
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ConfigError(f"model.checkpoint_blocks must be null (all blocks) or an integer "
                              f">= 1, got {blocks!r}")
        if config["model"]["checkpoint"] == "none":
            raise ConfigError("model.checkpoint_blocks needs model.checkpoint=teacher|student|both")
    d = config["data"]
    hw = d["hw_decoder_load"]
    if hw is not None and (isinstance(hw, bool) or not isinstance(hw, (int, float))):
        raise ConfigError(f"data.hw_decoder_load must be null (DALI's default) or a number in "
                          f"[0, 1], got {hw!r}")
    try:  # the rules of the DALI stages' placement (decode, augment, hardware decoder share)
        placement(True, d["decode_device"], d["augment_device"], hw)
    except ValueError as err:
        raise ConfigError(f"data.{err}") from err
    if d["image_size"] is not None:
        if not d["image_size"] >= 1:
            raise ConfigError(f"data.image_size must be >= 1, got {d['image_size']}")
        if d["cutout"] >= d["image_size"]:
            raise ConfigError(f"data.cutout must be below data.image_size ({d['image_size']}), "
                              f"got {d['cutout']}")
    percent = d["labeled_percent"]
    if percent is not None and not 0 < percent <= 100:
        raise ConfigError(f"data.labeled_percent must be in (0, 100], got {percent}")
    if d["name"] == "digits" and d["pad"] >= DIGITS_SIDE:
        raise ConfigError(f"data.pad must be below the digits' side ({DIGITS_SIDE}), "
                          f"got {d['pad']}")
    if d["name"] == "digits":  # embedded: a folder setting would be ignored without a word
        for key in FOLDER_ONLY:
            if d[key] is not None:
                raise ConfigError(f"data.{key} is read from files (data.name=image_folder or "
                                  f"cifar_batches); data.name=digits is embedded and has none")
    if not 0.0 < config["data"]["test_fraction"] < 1.0:
        raise ConfigError("data.test_fraction must be in (0, 1), "
                          f"got {config['data']['test_fraction']}")
    if not 0.0 <= config["train"]["ema_decay"] < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config['train']['ema_decay']}")
    t = config["train"]
    # the profiler must not run (not even warm up) while the step's graph is captured
    earliest = GRAPH_WARMUP_STEPS + 2
    if t["cuda_graph"] is True and t["profile_steps"] and t["profile_from"] < earliest:
        raise ConfigError(f"train.profile_from must be >= {earliest} under train.cuda_graph (the "
                          f"graph is captured at step {GRAPH_WARMUP_STEPS + 1} of a session), "
                          f"got {t['profile_from']}")
    mpl = mpl_config(config)  # MPL settings: validated by MPLConfig itself
    _validate_reduced(config, mpl)
    if config["method"] == "mpl" and mpl.teacher_weak_no_grad in WEAK_THROUGH_BATCH_NORM:
        # the weak view's rows constant in the teacher's forward (mpl_fast.mpl.constant_rows), or
        # normalised with the other views' statistics (shared_statistics): SyncBatchNorm's
        # statistics across processes would be computed outside either
        if t["sync_bn"]:
            raise ConfigError(f"mpl.teacher_weak_no_grad={mpl.teacher_weak_no_grad} does not go "
                              "with train.sync_bn (SyncBatchNorm computes its statistics outside "
                              "the step's reach)")


REDUCED = "reduced"  # model.teacher: Reduced MPL's teacher


def _validate_reduced(config, mpl: MPLConfig):
    m = config["model"]
    if m["teacher"] != REDUCED:
        if m["teacher_logits"] is not None:
            raise ConfigError(f"model.teacher_logits is Reduced MPL's input: it needs "
                              f"model.teacher={REDUCED}")
        return
    if m["teacher_logits"] is None:
        raise ConfigError(f"model.teacher={REDUCED} needs model.teacher_logits: the folder "
                          "`mpl-fast logits` wrote")
    if config["method"] != "mpl":
        raise ConfigError(f"model.teacher={REDUCED} is a teacher: it needs method=mpl")
    if m["checkpoint"] in ("teacher", "both"):
        raise ConfigError(f"model.teacher={REDUCED} is a small MLP without blocks to checkpoint: "
                          "model.checkpoint can be none or student")
    if not m["reduced_temperature"] > 0:
        raise ConfigError(f"model.reduced_temperature must be > 0, got {m['reduced_temperature']}")
    if mpl.uda_weight:
        raise ConfigError(f"model.teacher={REDUCED} has one stored row an image, no weak and "
                          "strong views: UDA cannot run (set mpl.uda_weight=0)")


def mpl_config(config) -> MPLConfig:
    section = dict(config["mpl"])
    name = section.pop("preset")
    changes = {k: v for k, v in section.items() if v is not None}
    try:
        return mpl_preset(name, **changes)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err


def dump(config) -> str:
    return yaml.safe_dump(config, sort_keys=False)
