"""`validate(config)`, the shared data block and `parse_arg`: every built-in config and
arg loads, keeps its values and validates; bad values and unknown keys fail by name."""
import itertools
import re

import ml_collections
import pytest

from mmjax.config import (DATA_FIELDS, SOURCE_FIELDS, ConfigError, base_config, data_block,
                          data_fields, load_config, parse_arg)
from mmjax.config_checks import EVAL_FIELDS, FINETUNE_KEYS, GROUP_KEYS, validate

from conftest import ROOT

STRATEGIES = ("full", "partial", "per_modality", "linear_probe", "progressive", "lora",
              "adapters")


def _finetune_digits_specs():
  for strategy in ("", *STRATEGIES):
    for n in range(4):
      for extra in itertools.combinations(("tiny", "augment", "clip_pretrain"), n):
        arg = ",".join(t for t in (strategy, *extra) if t)
        yield "finetune_digits" + (f":{arg}" if arg else "")


# Every built-in config with every documented arg and combination of args.
SPECS = [
    "demo", "demo:tiny", "bench", "finetune_itm", "finetune_itm:tiny", "finetune_ner",
    "finetune_ner:tiny", "finetune_vqa", "finetune_vqa:tiny", "pretrain_files",
    "pretrain_files:/data/pairs.jsonl", "pretrain_tfds", "pretrain_tfds:my_dataset",
    *(f"distill_digits:{role}{tiny}" for role in ("teacher", "student", "distill")
      for tiny in ("", ",tiny")),
    *_finetune_digits_specs(),
    # Own data: a path that is not there sizes the recipe by its defaults.
    "classify_files:/data/images", "classify_files:/data/images,tiny",
    "classify_files:/data/{split}.jsonl,tower=resnet", "classify_files:/data/x.csv,tiny",
    "classify_text:/data/{split}.jsonl", "classify_text:/data/texts.csv,tiny",
    "caption_shapes", "caption_shapes:tiny", "caption_shapes:nocontrastive",
    "caption_shapes:tiny,nocontrastive", "vqa_gen_shapes", "vqa_gen_shapes:tiny",
    "lm_text:/data/corpus.txt", "lm_text:/data/docs.jsonl,max_len=64", "lm_text:/data/c.txt,tiny",
    *(f"{name}_b16{arg}" for name in ("clip", "siglip") for arg in (
        "", ":smoke", ":data=tfds", ":remat=full,scan=False", ":data=tfds,remat=dots_saveable")),
]


def test_specs_cover_every_config_file():
  files = {p.stem for p in (ROOT / "configs").glob("*.py")}
  assert files == {s.partition(":")[0] for s in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_and_arg_validates(spec):
  config = load_config(spec)
  validate(config)
  validate(config, process_count=2, device_count=8)   # every batch is a multiple of 16
  validate(config, training=False)


# Values of the configs before they were rebuilt on data_block / config_blocks
# (a full to_dict() comparison showed only the new data fields, at their defaults).
KEYS = ("total_steps", "batch_size", "eval_batch_size", "keep_checkpoints", "optim.lr",
        "optim.warmup_steps", "data.name", "data.max_len", "data.vocab_size",
        "data.augment.crop_scale", "data.augment.flip", "data.eval_size", "data.train_examples",
        "model.image.width", "model.image.depth", "model.text.width", "model.text.depth",
        "model.fusion.depth", "model.embed_dim")
_ = None   # absent
VALUES = {
    "demo": (1200, 64, 256, 2, 1.5e-3, 100, "shapes", 16, 256, (1.0, 1.0), False, 1024, 0,
             96, 3, 96, 2, 1, 96),
    "demo:tiny": (30, 16, 64, 2, 1.5e-3, 100, "shapes", 16, 256, (1.0, 1.0), False, 64, 0,
                  32, 1, 32, 1, 1, 32),
    "bench": (1000, 64, 256, 1, 1e-4, 100, "shapes", 32, 256, (1.0, 1.0), False, 1024, 0,
              192, 6, 192, 6, _, 128),
    "finetune_itm:tiny": (20, 16, 64, 1, 3e-4, 2, "shapes", 16, 256, (1.0, 1.0), False, 64, 0,
                          32, 1, 32, 1, 1, 32),
    "finetune_ner": (300, 64, 256, 1, 1e-3, 30, "shapes", 16, 256, (1.0, 1.0), False, 1024, 0,
                     _, _, 96, 2, _, _),
    "finetune_vqa": (1500, 64, 256, 1, 1e-3, 100, "shapes", 16, 256, (1.0, 1.0), False, 1024,
                     0, 96, 3, 96, 2, 1, _),
    "pretrain_files:/p.jsonl": (2000, 64, 128, 2, 5e-4, 200, "files", 32, 4096, (0.6, 1.0),
                                True, _, 0, 0, 6, 0, 6, 2, 256),
    "pretrain_tfds:x": (2000, 64, 128, 2, 1e-3, 100, "tfds", 16, 1024, (0.8, 1.0), True, _, 0,
                        128, 4, 128, 4, 1, 128),
    "distill_digits:teacher": (500, 64, 256, 1, 1e-3, 50, "digits", 16, 256, (0.8, 1.0), False,
                               _, 0, 96, 4, _, _, _, _),
    "distill_digits:student,tiny": (4, 16, 128, 1, 1e-3, 1, "digits", 16, 256, (0.8, 1.0),
                                    False, _, 48, 32, 1, _, _, _, _),
    "distill_digits:distill": (400, 64, 256, 1, 1e-3, 50, "digits", 16, 256, (0.8, 1.0), False,
                               _, 150, 64, 2, _, _, _, _),
    "finetune_digits:lora": (600, 64, 256, 1, 1e-3, 50, "digits", 16, 256, (0.8, 1.0), False,
                             _, 0, 96, 4, _, _, _, _),
    "finetune_digits:clip_pretrain,tiny": (8, 16, 128, 1, 1e-3, 2, "digits", 16, 256,
                                           (0.8, 1.0), False, _, 0, 32, 2, 32, 1, _, 32),
}


@pytest.mark.parametrize("spec", VALUES)
def test_configs_keep_their_values(spec):
  config = load_config(spec)
  got = tuple(_get(config, key) for key in KEYS)
  assert dict(zip(KEYS, got)) == dict(zip(KEYS, VALUES[spec]))


def _get(config, key):
  for part in key.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return None
    config = config[part]
  return config


def test_config_arg_details_are_kept():
  lora = load_config("finetune_digits:lora,tiny")
  assert (lora.finetune.strategy, lora.finetune.lora_rank) == ("lora", 8)
  assert lora.model.image.patch == 8 and lora.model.image.heads == 2
  aug = load_config("finetune_digits:tiny,augment")
  assert aug.data.augment.randaugment.to_dict() == dict(num_ops=2, magnitude=9)
  assert aug.mix.to_dict() == dict(mixup=0.2, cutmix=1.0, prob=0.5, switch_prob=0.5)
  assert "finetune" not in load_config("finetune_digits:clip_pretrain")
  assert load_config("finetune_vqa").data.text_field == "question"
  assert load_config("finetune_ner").data.token_labels == "word_tags"
  assert load_config("pretrain_files:/d/{split}.csv").data.path == "/d/{split}.csv"
  assert load_config("pretrain_tfds:cifar").data.tfds_name == "cifar"
  assert load_config("distill_digits:distill").distill.temperature == 4.0


@pytest.mark.parametrize("spec", [s for s in SPECS if ":" not in s or s.endswith("tiny")])
def test_every_data_field_can_be_overridden(spec):
  """Fields the pipeline reads exist in every config, so a run can set them."""
  config = load_config(spec, ["--config.data.train_examples=100", "--config.data.text_field=q",
                              "--config.data.token_labels=tags"])
  assert (config.data.train_examples, config.data.text_field) == (100, "q")
  assert set(config.data) == set(data_fields(config.data.name))


def test_every_config_has_the_one_keep_checkpoints_default():
  assert base_config().keep_checkpoints == 2
  for spec in SPECS:
    assert load_config(spec).keep_checkpoints >= 1


def test_data_block_rejects_an_unknown_field():
  with pytest.raises(ConfigError, match=r"unknown field 'train_exampels'; did you mean "
                                        r"'train_examples'\?"):
    data_block("digits", train_exampels=5)
  with pytest.raises(ConfigError, match=r"data.name='shape': expected one of"):
    data_block("shape")


def test_data_fields_cover_what_the_data_package_reads():
  """Every `data.get('x', ...)` in mmjax/data names a field of the shared data block."""
  from mmjax.data import sources
  assert set(SOURCE_FIELDS) == set(sources.SOURCES)
  known = set(DATA_FIELDS).union(*SOURCE_FIELDS.values())
  read = set()
  for path in (ROOT / "mmjax" / "data").glob("*.py"):
    read |= set(re.findall(r"\bdata\.get\(\s*['\"](\w+)['\"]", path.read_text()))
  assert read and read <= known, sorted(read - known)
  for name in SOURCE_FIELDS:
    assert set(sources.source_module(name).CORPUS_FIELDS) <= set(data_fields(name))


def test_group_schemas_match_the_code_that_reads_them():
  from mmjax.evals import EVALUATORS
  from mmjax.train.mixing import DEFAULTS as MIX
  from mmjax.tuning.config import finetune_config, init_config
  assert set(EVAL_FIELDS) == set(EVALUATORS)
  assert set(GROUP_KEYS["mix"]) == set(MIX)
  assert set(FINETUNE_KEYS) == set(finetune_config())
  assert set(GROUP_KEYS["init"]) == set(init_config())


def _error(spec, overrides=(), **kwargs):
  config = load_config(spec, list(overrides))
  with pytest.raises(ConfigError) as e:
    validate(config, **kwargs)
  return str(e.value)


@pytest.mark.parametrize("override, message", [
    ("total_steps=-5", "total_steps=-5: expected an integer >= 1"),
    ("total_steps=0", "total_steps=0: expected an integer >= 1"),
    ("stop_after=-1", "stop_after=-1: expected an integer >= 0"),
    ("batch_size=0", "batch_size=0: expected an integer >= 1"),
    ("eval_batch_size=0", "eval_batch_size=0: expected an integer >= 1"),
    ("log_every=0", "log_every=0: expected an integer >= 1"),
    ("eval_every=-1", "eval_every=-1: expected an integer >= 0"),
    ("checkpoint_every=-10", "checkpoint_every=-10: expected an integer >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints=0: expected an integer >= 1"),
    ("optim.lr=0.0", "optim.lr=0.0: expected a finite number > 0"),
    ("optim.lr=1e400", "optim.lr=inf: expected a finite number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: expected a finite number >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: expected an integer >= 0"),
    ("optim.clip_norm=-1.0", "optim.clip_norm=-1.0: expected a finite number >= 0"),
    ("optim.accum_steps=0", "optim.accum_steps=0: expected an integer >= 1"),
    ("optim.b1=1.0", "optim.b1=1.0: expected a finite number in [0, 1)"),
    ("optim.b2=-0.5", "optim.b2=-0.5: expected a finite number in [0, 1)"),
    ("model.dropout=1.5", "model.dropout=1.5: expected a finite number in [0, 1]"),
    ("model.drop_path=-0.1", "model.drop_path=-0.1: expected a finite number in [0, 1]"),
    ("model.mlm_prob=2.0", "model.mlm_prob=2.0: expected a finite number in [0, 1]"),
    ("data.image_size=0", "data.image_size=0: expected an integer >= 1"),
    ("data.max_len=1", "data.max_len=1: expected an integer >= 2"),
    ("data.train_examples=-3", "data.train_examples=-3: expected an integer >= 0"),
    ("early_stop.patience=0", "early_stop.patience=0: expected an integer >= 1"),
    ("early_stop.min_delta=-0.01", "early_stop.min_delta=-0.01: expected a finite number >= 0"),
    ("early_stop.mode=median", "early_stop.mode='median': expected one of ('max', 'min')"),
    ("objectives.itm=-0.5", "objectives.itm=-0.5: expected a finite number >= 0"),
    ("objectives.itm=1e400", "objectives.itm=inf: expected a finite number >= 0"),
    ("mesh.fsdp=0", "mesh.fsdp=0: expected an integer >= 1, or -1"),
])
def test_bad_values_name_key_value_and_range(override, message):
  assert message in _error("demo:tiny", ["--config." + override])


@pytest.mark.parametrize("spec, override, message", [
    ("finetune_digits:tiny,augment", "mix.prob=1.5",
     "mix.prob=1.5: expected a finite number in [0, 1]"),
    ("finetune_digits:tiny,augment", "mix.switch_prob=-1.0", "mix.switch_prob=-1.0"),
    ("finetune_digits:tiny", "objective_options.classify.label_smoothing=1.5",
     "objective_options.classify.label_smoothing=1.5: expected a finite number in [0, 1]"),
    ("distill_digits:distill,tiny", "distill.temperature=0.0",
     "distill.temperature=0.0: expected a finite number > 0"),
])
def test_bad_values_in_optional_groups(spec, override, message):
  assert message in _error(spec, ["--config." + override])


def test_batches_must_split_over_processes_and_devices():
  config = load_config("demo:tiny", ["--config.batch_size=30"])
  with pytest.raises(ConfigError, match="^batch_size=30 must divide over 1 processes and 8 "
                                        "devices$"):
    validate(config, device_count=8)
  validate(config, device_count=2)
  assert "over 4 processes" in _error("demo:tiny", ["--config.batch_size=30"], process_count=4)
  assert "eval_batch_size=60 must divide" in _error(
      "demo:tiny", ["--config.eval_batch_size=60"], device_count=8)
  validate(config, device_count=8, training=False)   # evaluation reads eval_batch_size only


def test_mesh_must_fit_the_devices():
  validate(load_config("demo:tiny", ["--config.mesh.fsdp=2"]), device_count=8)
  assert "does not fit the 8 devices" in _error(
      "demo:tiny", ["--config.mesh.fsdp=3"], device_count=8)
  assert "does not fit the 4 devices" in _error(
      "demo:tiny", ["--config.mesh.data=2", "--config.mesh.fsdp=1"], device_count=4)
  assert "at most one axis may be -1" in _error("demo:tiny", ["--config.mesh.fsdp=-1"])
  validate(load_config("demo:tiny", ["--config.mesh={}"]), device_count=8)   # the default


def test_objectives_need_a_positive_weight_to_train():
  zero = ["--config.objectives.contrastive=0.0", "--config.objectives.itm=0.0"]
  assert "training needs at least one objective with a weight > 0" in _error("demo:tiny", zero)
  validate(load_config("demo:tiny", zero), training=False)
  # A converted classifier's workdir config has no objectives: it can be evaluated.
  validate(load_config("demo:tiny", ["--config.objectives={}"]), training=False)
  assert "training needs" in _error("demo:tiny", ["--config.objectives={}"])


def test_objective_options_are_set_from_the_command_line_and_checked():
  c = load_config("demo:tiny", ["--config.objective_options.contrastive.chunked=True"])
  assert c.objective_options.contrastive.chunked is True
  validate(c)
  bogus = ["--config.objective_options.contrastive.chunkd=True"]
  assert "objective_options.contrastive.chunkd: the contrastive objective has no option " \
      "'chunkd'" in _error("demo:tiny", bogus)
  assert "'sigmoid' is not in objectives" in _error(
      "demo:tiny", ["--config.objective_options.sigmoid.chunked=True"])


def test_accumulation_must_divide_total_steps():
  assert ("optim.accum_steps=4 must divide total_steps=30" in
          _error("demo:tiny", ["--config.optim.accum_steps=4"]))
  validate(load_config("demo:tiny", ["--config.optim.accum_steps=3"]))


def test_warmup_may_exceed_a_short_run():
  validate(load_config("demo:tiny", ["--config.total_steps=5", "--config.optim.warmup_steps=100"]))


def test_early_stop_needs_evaluations_and_an_evaluator_metric():
  on = ["--config.early_stop.metric=report_acc"]
  assert "set eval_every > 0" in _error("finetune_digits:tiny", on)
  assert "early_stop.metric='reprot_acc' is no evaluator's metric" in _error(
      "finetune_digits:tiny", ["--config.early_stop.metric=reprot_acc", "--config.eval_every=4"])
  validate(load_config("finetune_digits:tiny", on + ["--config.eval_every=4"]))


@pytest.mark.parametrize("spec, override, message", [
    ("demo:tiny", "early_stop={'metrc': 'itm_acc'}",
     "unknown config key 'early_stop.metrc'; did you mean 'early_stop.metric'?"),
    ("demo:tiny", "optim={'lr': 0.001, 'nmae': 'sgd'}",
     "unknown config key 'optim.nmae'; did you mean 'optim.name'?"),
    ("demo:tiny", "mesh={'data': -1, 'fdsp': 1}",
     "unknown config key 'mesh.fdsp'; did you mean 'mesh.fsdp'?"),
    ("finetune_digits:tiny,augment", "mix={'mixupp': 0.2}",
     "unknown config key 'mix.mixupp'; did you mean 'mix.mixup'?"),
    ("distill_digits:distill,tiny", "distill={'teachr': '/w', 'temperature': 4.0}",
     "unknown config key 'distill.teachr'; did you mean 'distill.teacher'?"),
    ("finetune_digits:tiny", "finetune={'strategy': 'lora', 'lora_rnak': 4}",
     "unknown config key 'finetune.lora_rnak'; did you mean 'finetune.lora_rank'?"),
    ("finetune_digits:tiny", "model.classifier={'input': 'image', 'num_class': 10}",
     "unknown config key 'model.classifier.num_class'; did you mean "
     "'model.classifier.num_classes'?"),
    ("demo:tiny", "evals={'r': {'type': 'retrieval', 'splt': 'test'}}",
     "unknown config key 'evals.r.splt'; did you mean 'evals.r.split'?"),
    ("demo:tiny", "evals={'r': {'type': 'retreival'}}",
     "evals.r.type='retreival' unknown; did you mean 'retrieval'?"),
    ("demo:tiny", "evals={'r': 'retrieval'}", "evals.r='retrieval': expected a dict"),
    ("demo:tiny", "evals.zeroshot_color.data={'num_object': (1, 1)}",
     "unknown config key 'evals.zeroshot_color.data.num_object'; did you mean "
     "'evals.zeroshot_color.data.num_objects'?"),
    ("demo:tiny", "data={'name': 'shapes', 'image_size': 32, 'max_len': 16, 'trian_size': 64}",
     "unknown config key 'data.trian_size'; did you mean 'data.train_size'?"),
    ("demo:tiny", "data={'name': 'shapse', 'image_size': 32}",
     "data.name='shapse': expected one of"),
    ("finetune_digits:tiny", "objective_options={'clasify': {'label': 'label'}}",
     "objective_options.clasify: 'clasify' is not in objectives ['classify']"),
])
def test_unknown_keys_in_fixed_groups_name_the_nearest(spec, override, message):
  assert message in _error(spec, ["--config." + override])


def test_unknown_top_level_key_names_the_nearest():
  config = load_config("demo:tiny")
  with config.unlocked():
    config.keep_checkpoint = 1
  with pytest.raises(ConfigError, match=r"unknown config key 'keep_checkpoint'; did you mean "
                                        r"'keep_checkpoints'\?"):
    validate(config)


def test_parse_arg_flags_and_typed_values():
  flags, values = parse_arg("lora,tiny,rank=4,alpha=8", {"lora", "tiny", "full"},
                            dict(rank=8, alpha=16.0, name="x"))
  assert flags == {"lora", "tiny"}
  assert values == dict(rank=4, alpha=8.0, name="x")
  assert type(values["alpha"]) is float
  assert parse_arg(None, {"tiny"}) == (set(), {})
  assert parse_arg("", {"tiny"}, dict(rank=2)) == (set(), dict(rank=2))


@pytest.mark.parametrize("arg, message", [
    ("tny", r"configs/x.py: unknown arg 'tny' \(did you mean 'tiny'\?\); known: flags "
            r"\['lora', 'tiny'\], key=value \['rank'\]"),
    ("rank", r"unknown arg 'rank'"),                 # a key=value key is not a flag
    ("tiny=1", r"unknown arg 'tiny=1'"),             # nor a flag a key
    ("rank=four", r"configs/x.py arg rank=four: cannot parse as int"),
    ("rank=1.5", r"arg rank=1.5: expected int, got float"),
    ("rank=1,rank=2", r"arg 'rank' given twice"),
])
def test_parse_arg_errors_name_the_token(arg, message):
  with pytest.raises(ConfigError, match=message):
    parse_arg(arg, {"lora", "tiny"}, dict(rank=8), where="configs/x.py")


@pytest.mark.parametrize("spec, message", [
    ("demo:tiyn", r"configs/demo.py: unknown arg 'tiyn' \(did you mean 'tiny'\?\)"),
    ("bench:tiny", r"configs/bench.py: unknown arg 'tiny'; known: flags \[\]"),
    ("finetune_digits:lora,adapters", r"names 2 strategies \['adapters', 'lora'\]"),
    ("finetune_digits:lroa", r"did you mean 'lora'"),
    ("distill_digits:tiny", r"needs exactly one of \('teacher', 'student', 'distill'\)"),
    ("distill_digits:teacher,student", r"needs exactly one of"),
])
def test_config_args_are_checked(spec, message):
  with pytest.raises(ConfigError, match=message):
    load_config(spec)
