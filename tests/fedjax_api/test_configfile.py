"""Config files and --set overrides: schema, precedence, round trip, errors, docs."""

import collections
import os
import re
import string
import types
import typing
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedjax_api import config, configfile, listing, tasks, toml_text
from fedjax_api.config import ConfigError, ExperimentConfig
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry as algorithms
from tests import generated_docs
from tests.fedjax_api import tiny_task

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
FIELDS = list(attrs.fields_dict(ExperimentConfig))


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.strip(), repr(message)
    return message


# ------------------------------------------------------------------------------- schema


def test_schema_reaches_every_field_exactly_once():
    fields = collections.Counter(k.field for k in configfile.SCHEMA.values())
    assert sorted(fields) == sorted(FIELDS), "a field of ExperimentConfig has no key in SCHEMA"
    assert set(fields.values()) == {1}
    assert all(key == k.key for key, k in configfile.SCHEMA.items())


def test_schema_types_match_the_field_annotations():
    expected = {int: "integer", float: "number", str: "string", bool: "boolean"}
    for k in configfile.SCHEMA.values():
        annotation = attrs.fields_dict(ExperimentConfig)[k.field].type
        if isinstance(annotation, types.UnionType):  # int | None: TOML has no null
            annotation, = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is dict:
            assert k.type == "table", k
        elif typing.get_origin(annotation) is tuple:  # tuple[str, ...]: an array of strings
            assert typing.get_args(annotation) == (str, ...) and k.type == "array", k
        else:
            assert expected[annotation] == k.type, k


# --------------------------------------------------------------------------------- docs


def _builtin_task_names():
    return [n for n in tasks.names() if n != tiny_task.NAME]


@pytest.mark.parametrize("name, make", [
    ("schema", listing.schema_markdown),
    ("registries", lambda: listing.registries_markdown(_builtin_task_names())),
])
def test_docs_generated_blocks_are_current(name, make):
    generated_docs.check(DOCS, name, make(), ".venv/bin/python -m pytest -q "
                         "tests/fedjax_api/test_configfile.py -k docs")


def test_docs_list_every_field_key_and_registered_name():
    table = generated_docs.block(DOCS, "schema")
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.strip().splitlines()[2:]]
    assert collections.Counter(r[4].strip("`") for r in rows) == collections.Counter(FIELDS)
    assert [r[0].strip("`") for r in rows] == list(configfile.SCHEMA)
    listing = generated_docs.block(DOCS, "registries")
    names = re.findall(r"^- `([^`]+)`:", listing, re.MULTILINE)
    assert names == (_builtin_task_names() + sorted(algorithms.ALGORITHMS)
                     + sorted(aggregators.AGGREGATORS))
    for name in algorithms.ALGORITHMS:
        line = re.search(rf"^- `{re.escape(name)}`:.*$", listing, re.MULTILINE)[0]
        for option in algorithms.options(name):
            if option not in algorithms.get(name).needs:
                assert f"`{option}" in line, (name, option)
    for name in aggregators.AGGREGATORS:
        line = re.search(rf"^- `{re.escape(name)}`:.*$", listing, re.MULTILINE)[0]
        for option in aggregators.options(name):
            assert f"`{option}" in line, (name, option)


def test_docs_name_the_real_command_line_options():
    import inspect

    from cli import main

    params = set(inspect.signature(main.run).parameters)
    renamed = {"algorithm_options": "option", "aggregator_options": "aggregator_option"}
    for field in FIELDS:
        assert renamed.get(field, field) in params, f"fedjax run has no option for {field}"
        flag = listing.flag_of(field)
        assert flag.strip("`").split()[0] in (
            "TASK", f"--{renamed.get(field, field).replace('_', '-')}"), (field, flag)


def test_docs_examples_resolve(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert len(blocks) == 2
    cfg = configfile.resolve_file(write(tmp_path, blocks[0]), [], {})
    assert (cfg.task, cfg.algorithm, cfg.rounds, cfg.aggregator) == (
        "shakespeare-plays", "fedadam", 100, "trimmed_mean")
    assert cfg.algorithm_options == {"b2": 0.999, "eps": 1e-8}
    assert cfg.aggregator_options == {"beta": 0.1} and cfg.max_steps == 50
    assert cfg.eval_every == 10 and cfg.out == "runs/adam-trimmed"
    private = configfile.resolve_file(write(tmp_path, blocks[1], "dp.toml"), [], {},
                                      default_task="shakespeare-plays")
    assert private.private and (private.clip, private.dp_epsilon, private.dp_delta) == (
        1.0, 8.0, 1e-6)


# --------------------------------------------------------------------------------- load

EVERY_KEY = """
task = "synthetic"
rounds = 7
seed = 3

[algorithm]
name = "fedprox"

[algorithm.options]
proximal_weight = 0.5

[client]
lr = 1            # an integer is a number
per_round = 4
batch_size = 8
epochs = 2
max_steps = 9
sampling = "poisson"

[server]
lr = 0.25
skip_nonfinite_clients = true

[aggregator]
name = "trimmed_mean"
options = { beta = 0.2 }

[eval]
every = 5
train_clients = 6
personalize_steps = 2

[privacy]
clip = 0.5
noise_multiplier = 1.1
epsilon = 3.0
delta = 1e-5
accountant = "pld"
adaptive_clip = true
noise_cohort_size = 100

[run]
out = "runs/x"
data = "data/leaf"
chunk_size = 2
checkpoint_every = 4
keep_checkpoints = 2
tensorboard = true
"""


def test_load_maps_every_key_to_its_field(tmp_path):
    assert configfile.load(write(tmp_path, EVERY_KEY)) == dict(
        task="synthetic", rounds=7, seed=3, algorithm="fedprox",
        algorithm_options={"proximal_weight": 0.5}, client_lr=1.0, clients_per_round=4,
        batch_size=8, epochs=2, max_steps=9, sampling="poisson", server_lr=0.25,
        skip_nonfinite_clients=True, aggregator="trimmed_mean",
        aggregator_options={"beta": 0.2}, eval_every=5, eval_train_clients=6,
        personalize_steps=2, clip=0.5, noise_multiplier=1.1, dp_epsilon=3.0, dp_delta=1e-5,
        dp_accountant="pld", adaptive_clip=True, noise_cohort_size=100, out="runs/x",
        data="data/leaf", chunk_size=2, checkpoint_every=4, keep_checkpoints=2, tensorboard=True)
    assert isinstance(configfile.load(write(tmp_path, EVERY_KEY))["client_lr"], float)


def test_load_dotted_keys_shorthands_and_empty_sections(tmp_path):
    text = ('algorithm = "fedadam"\naggregator = "krum"\nclient.lr = 0.1\n'
            'eval.every = 3\n[server]\n[privacy]\n')
    assert configfile.load(write(tmp_path, text)) == dict(
        algorithm="fedadam", aggregator="krum", client_lr=0.1, eval_every=3)
    assert configfile.load(write(tmp_path, "")) == {}
    assert configfile.load(write(tmp_path, "\ufeffrounds = 2\n")) == {"rounds": 2}  # BOM


def test_options_tables_take_any_toml_value_but_dates(tmp_path):
    text = ('[algorithm.options]\na = "x"\nb = [1, 2.5]\nc = { d = true }\n"odd key" = 1\n')
    assert configfile.load(write(tmp_path, text))["algorithm_options"] == {
        "a": "x", "b": [1, 2.5], "c": {"d": True}, "odd key": 1}
    message = one_line_error(configfile.load, write(tmp_path, "[aggregator.options]\n"
                                                              "when = 1979-05-27\n"))
    assert "aggregator.options.when expects a string, number" in message


# ---------------------------------------------------------------------------- overrides


def test_apply_overrides_parses_toml_values():
    got = configfile.apply_overrides({}, [
        "client.lr=0.1", "rounds=12", "privacy.adaptive_clip=true", "server.lr=2",
        "algorithm.options.b2=0.999", "algorithm.options.delay=uniform",
        "algorithm.options.list=[1, 2]", "aggregator.name=krum", "run.out=runs/a=b",
        "run.data=2024", 'task="shakespeare-plays"', "algorithm=fedadam",
        "client.sampling= poisson ", "algorithm.options.a.b=1"])
    assert got == dict(client_lr=0.1, rounds=12, adaptive_clip=True, server_lr=2.0,
                       algorithm_options={"b2": 0.999, "delay": "uniform", "list": [1, 2],
                                          "a": {"b": 1}},
                       aggregator="krum", out="runs/a=b", data="2024",
                       task="shakespeare-plays", algorithm="fedadam", sampling="poisson")
    assert isinstance(got["server_lr"], float)
    # A value is one TOML value: more lines are text, never more keys.
    assert configfile.apply_overrides({}, ["run.out=a\nrounds = 3"]) == {"out": "a\nrounds = 3"}
    assert "client.lr expects a number" in one_line_error(
        configfile.apply_overrides, {}, ["client.lr=1\nrounds = 3"])


def test_apply_overrides_merges_options_replaces_tables_and_copies():
    options = {"client_lr": 1.0, "algorithm_options": {"b1": 0.8, "b2": 0.9}}
    got = configfile.apply_overrides(options, ["algorithm.options.b2=0.99", "client.lr=0.5",
                                               "client.lr=0.25"])
    assert got == {"client_lr": 0.25, "algorithm_options": {"b1": 0.8, "b2": 0.99}}
    assert options == {"client_lr": 1.0, "algorithm_options": {"b1": 0.8, "b2": 0.9}}
    got = configfile.apply_overrides(options, ["algorithm.options={eps = 1e-3}"])
    assert got["algorithm_options"] == {"eps": 1e-3}
    got = configfile.apply_overrides({}, ['algorithm.options."odd key"=1'])
    assert got == {"algorithm_options": {"odd key": 1}}
    got = configfile.apply_overrides({"epochs": 3}, ["client={lr = 1, per_round = 2}"])
    assert got == {"epochs": 3, "client_lr": 1.0, "clients_per_round": 2}


# ----------------------------------------------------------------------------- resolve


def test_precedence_task_file_set_cli(tmp_path):
    defaults = tasks.entry("synthetic").defaults
    assert config.resolve("synthetic").client_lr == defaults.client_lr == 0.01
    path = write(tmp_path, 'task = "synthetic"\nrounds = 9\n[client]\nlr = 0.5\nepochs = 3\n'
                           '[algorithm]\nname = "fedadam"\n[algorithm.options]\nb1 = 0.5\n'
                           'b2 = 0.6\n')
    cfg = configfile.resolve_file(path, [], {})
    assert (cfg.rounds, cfg.client_lr, cfg.epochs, cfg.batch_size) == (
        9, 0.5, 3, defaults.batch_size)
    assert cfg.server_lr == defaults.server_lr["fedadam"]  # the task's, for the file's algorithm
    cfg = configfile.resolve_file(path, ["client.lr=0.2", "algorithm.options.b2=0.7"], {})
    assert (cfg.client_lr, cfg.epochs, cfg.algorithm_options) == (
        0.2, 3, {"b1": 0.5, "b2": 0.7})
    cli = dict(task=None, rounds=None, client_lr=0.1, epochs=None,
               algorithm_options={"eps": 0.01}, seed=None)
    cfg = configfile.resolve_file(path, ["client.lr=0.2", "algorithm.options.b2=0.7"], cli)
    assert (cfg.client_lr, cfg.rounds, cfg.epochs, cfg.seed) == (0.1, 9, 3, 0)
    assert cfg.algorithm_options == {"b1": 0.5, "b2": 0.7, "eps": 0.01}
    assert configfile.resolve_file(path, [], {"algorithm_options": {"b1": 0.1}}) \
        .algorithm_options == {"b1": 0.1, "b2": 0.6}


def test_task_comes_from_the_cli_then_the_file_then_the_default(tmp_path):
    path = write(tmp_path, 'task = "synthetic"\n')
    assert configfile.resolve_file(path, [], {"task": "shakespeare"}).task == "shakespeare"
    assert configfile.resolve_file(path, [], {"task": None},
                                   default_task="shakespeare-plays").task == "synthetic"
    assert configfile.resolve_file(None, ["task=emnist"], {}).task == "emnist"
    assert configfile.resolve_file(None, [], {}, default_task="synthetic").task == "synthetic"
    assert "no task" in one_line_error(configfile.resolve_file, None, [], {})


def test_task_defaults_fill_keys_left_out(tmp_path):
    cfg = configfile.resolve_file(write(tmp_path, "rounds = 2\n"), [], {},
                                  default_task=tiny_task.NAME)
    assert cfg == config.resolve(tiny_task.NAME, rounds=2)


# -------------------------------------------------------------------------- round trip

ROUND_TRIPS = [
    dict(task="shakespeare-plays"),
    dict(task="stackoverflow", algorithm="fedadam", rounds=3, aggregator="trimmed_mean",
         aggregator_options={"beta": 0.25}, algorithm_options={"b2": 0.5}, max_steps=7,
         out='runs/"quoted" \\ back\tslash\nnewline ünï \x7f', data="d", seed=5),
    dict(task="synthetic", algorithm="fedprox", clip=1.0, dp_epsilon=4.0, dp_delta=1e-6,
         adaptive_clip=True, dp_accountant="pld", sampling="poisson", noise_cohort_size=50,
         client_lr=1e-300, server_lr=1e300, skip_nonfinite_clients=True,
         checkpoint_every=0, keep_checkpoints=9),
    dict(task="synthetic", algorithm="agnostic_fedavg",
         algorithm_options={"init_domain_weights": [0.5, 0.5], "domain_algorithm": "pgd",
                            "init_domain_window": None}),
    dict(task="synthetic", aggregator="attack",
         aggregator_options={"inner": "krum", "fraction": 0.2, "scale": None}),
]


@pytest.mark.parametrize("options", ROUND_TRIPS)
def test_dump_load_round_trip(tmp_path, options):
    cfg = config.resolve(**options)
    text = configfile.dump(cfg)
    again = configfile.resolve_file(write(tmp_path, text), [], {})
    def drop_none(d):
        return {k: v for k, v in d.items() if v is not None}

    assert attrs.evolve(again, algorithm_options=drop_none(again.algorithm_options),
                        aggregator_options=drop_none(again.aggregator_options)) == attrs.evolve(
        cfg, algorithm_options=drop_none(cfg.algorithm_options),
        aggregator_options=drop_none(cfg.aggregator_options))
    kept = [line for line in text.splitlines() if not line.startswith("# ")]
    assert configfile.dump(again).splitlines()[2:] == kept
    assert "null" not in text and " = None" not in text


def test_dump_writes_the_schema_layout():
    cfg = config.resolve("synthetic", algorithm="fedadam", algorithm_options={"b2": 0.9},
                         out="runs/a")
    text = configfile.dump(cfg)
    assert '\n[algorithm]\nname = "fedadam"\n\n[algorithm.options]\n' in text
    assert "b2 = 0.9\n" in text and '[run]\nout = "runs/a"\n' in text
    assert text.index('task = "synthetic"') < text.index("[")  # root keys before tables
    assert "\nclip" not in text  # unset values are left out


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, expected", [
    ("[client]\nlrr = 0.1\n",
     "exp.toml: unknown key 'client.lrr'; did you mean 'client.lr'? (keys of [client]: lr, "),
    ("client_lr = 0.1\n", "exp.toml: unknown key 'client_lr'; did you mean 'client.lr'?"),
    ("lr = 0.1\n", "unknown key 'lr'; did you mean 'client.lr' or 'server.lr'?"),
    ("[evaluation]\nevery = 2\n", "unknown key 'evaluation.every'; did you mean 'eval.every'?"),
    ("roundz = 2\n", "unknown key 'roundz'; did you mean 'rounds'? (top-level keys: task, "),
    ('"client.lr" = 1\n', "unknown key '\"client.lr\"'"),
    ('rounds = "ten"\n', "exp.toml: rounds expects an integer, got string 'ten'"),
    ("rounds = 10.0\n", "rounds expects an integer, got float 10.0"),
    ("rounds = true\n", "rounds expects an integer, got boolean true"),
    ("[client]\nlr = true\n", "exp.toml: client.lr expects a number, got boolean true"),
    ("[client]\nlr = [1]\n", "client.lr expects a number, got an array"),
    ("[client]\nlr = { x = 1 }\n", "client.lr expects a number, got a table"),
    ("task = 3\n", "task expects a string, got integer 3"),
    ("[privacy]\nadaptive_clip = 1\n",
     "privacy.adaptive_clip expects true or false, got integer 1"),
    ("[algorithm]\noptions = 3\n", "algorithm.options expects a table, got integer 3"),
    ("algorithm = 3\n", "algorithm expects a table [algorithm] or a name string, got integer 3"),
    ("client = 3\n", "client expects a table [client], got integer 3"),
    ("[[client]]\nlr = 1\n", "client expects a table [client], got an array"),
    ("rounds = 1979-05-27\n", "rounds expects an integer, got date/time 1979-05-27"),
])
def test_file_mistakes_name_the_key(tmp_path, text, expected):
    assert expected in one_line_error(configfile.load, write(tmp_path, text))


LITERALS = {"string": '"x"', "integer": "3", "float": "1.5", "boolean": "true",
            "array": "[1]", "table": "{ a = 1 }", "date/time": "1979-05-27"}
ACCEPTS = {"string": {"string"}, "integer": {"integer"}, "number": {"integer", "float"},
           "boolean": {"boolean"}, "table": {"table"}, "array": set()}  # [1]: no strings


def test_every_key_refuses_every_wrong_type(tmp_path):
    checked = 0
    for key, k in configfile.SCHEMA.items():
        for kind, literal in LITERALS.items():
            path = write(tmp_path, f"{key} = {literal}\n")
            if kind in ACCEPTS[k.type]:
                configfile.load(path)
                continue
            message = one_line_error(configfile.load, path)
            assert f"{key} expects {toml_text.TYPE_WORDS[k.type]}, got " in message, message
            if k.type != "string":  # a string key takes any --set text as written
                message = one_line_error(configfile.apply_overrides, {}, [f"{key}={literal}"])
                assert f"{key} expects" in message, message
            checked += 1
    assert checked == sum(len(LITERALS) - len(ACCEPTS[k.type])
                          for k in configfile.SCHEMA.values())


@pytest.mark.parametrize("text, where", [
    ("rounds = 10\n[client\nlr = 1\n", "exp.toml:2:8: invalid TOML: Expected ']'"),
    ("rounds = \n", "exp.toml:1:10: invalid TOML: Invalid value"),
    ("rounds = 1\nrounds = 2\n", "exp.toml:2:11: invalid TOML: Cannot overwrite a value (a key"),
    ("rounds = 1\nrounds = 2", "exp.toml:2:11: invalid TOML: Cannot overwrite a value (a key"),
    ("[client", "exp.toml:1:8: invalid TOML: Expected ']'"),
    ("a = " + "[" * 5000, "exp.toml: invalid TOML: arrays or tables nested too deeply"),
    ("rounds = " + "9" * 5000, "exp.toml: invalid TOML: Exceeds the limit"),
    ("x = \"\x00\"", "exp.toml:1:6: invalid TOML: Illegal character '\\x00'"),
])
def test_toml_syntax_errors_give_file_line_and_column(tmp_path, text, where):
    message = one_line_error(configfile.load, write(tmp_path, text))
    assert message.endswith(message.split(str(tmp_path) + os.sep)[-1])
    assert message.split(os.sep)[-1].startswith(where), message


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.toml"
    assert one_line_error(configfile.load, missing) == f"config file {missing} not found"
    assert "is a directory" in one_line_error(configfile.load, tmp_path)
    path = tmp_path / "bin.toml"
    path.write_bytes(b"rounds = 1\nx = '\xff'\n")
    assert one_line_error(configfile.load, path).endswith(
        "bin.toml:2: invalid TOML: not UTF-8 text (byte 16)")
    odd = tmp_path / "a\nb.toml"
    assert "'" in one_line_error(configfile.load, odd)  # an odd name is quoted, on one line


@pytest.mark.parametrize("item, expected", [
    ("client.lr", "--set expects KEY=VALUE (e.g. client.lr=0.1), got 'client.lr'"),
    ("=1", "--set expects KEY=VALUE"),
    ("client.lrr=1", "--set 'client.lrr=1': unknown key 'client.lrr'; did you mean 'client.lr'?"),
    ("client..lr=1", "'client..lr' is not a dotted key like client.lr"),
    ("a b=1", "is not a dotted key"),
    ("rounds=ten", "--set 'rounds=ten': rounds expects an integer, got string 'ten'"),
    ("client.lr=", "client.lr expects a number, got string ''"),
    ("privacy.adaptive_clip=yes", "privacy.adaptive_clip expects true or false, got string 'yes'"),
    ("client=1", "client expects a table [client], got integer 1"),
    ("client={lrr = 1}", "--set 'client={lrr = 1}': unknown key 'client.lrr'; did you mean"),
    ('"client.lr"=1', "unknown key '\"client.lr\"'"),
    ("aggregator.options=3", "aggregator.options expects a table, got integer 3"),
    ("algorithm.options.x=1979-05-27", "algorithm.options.x expects a string, number"),
])
def test_set_mistakes_name_the_key(item, expected):
    assert expected in one_line_error(configfile.apply_overrides, {}, [item])


def test_options_the_algorithm_or_aggregator_do_not_take(tmp_path):
    path = write(tmp_path, 'algorithm = "fedadam"\n')
    message = one_line_error(configfile.resolve_file, path, ["algorithm.options.b22=1"], {},
                             default_task="synthetic")
    assert message == ("unknown key 'algorithm.options.b22': algorithm 'fedadam' has no option "
                       "'b22'; did you mean 'algorithm.options.b2'? its options are: b1, b2, eps")
    message = one_line_error(configfile.resolve_file, None,
                             ["aggregator=trimmed_mean", "aggregator.options.betta=0.2"], {},
                             default_task="synthetic")
    assert "did you mean 'aggregator.options.beta'?" in message
    # The algorithm named on the command line is the one whose options count.
    message = one_line_error(configfile.resolve_file, path, ["algorithm.options.b2=0.9"],
                             {"algorithm": "fedprox"}, default_task="synthetic")
    assert "algorithm 'fedprox' has no option 'b2'" in message
    # Facts the run fills in are not options.
    message = one_line_error(configfile.resolve_file, None,
                             ["algorithm=feddyn", "algorithm.options.num_clients=3"], {},
                             default_task="synthetic")
    assert "has no option 'num_clients'" in message and "its options are: alpha" in message


def test_out_of_range_values_keep_configs_messages(tmp_path):
    assert one_line_error(configfile.resolve_file, write(tmp_path, "rounds = 0\n"), [], {},
                          default_task="synthetic") == "rounds must be at least 1, got 0"
    assert "unknown task 'nope'" in one_line_error(configfile.resolve_file, None,
                                                   ["task=nope"], {})
    assert "unknown aggregator 'krumm'; did you mean 'krum'?" in one_line_error(
        configfile.resolve_file, None, ["aggregator=krumm"], {}, default_task="synthetic")


# ------------------------------------------------------------------- property-based tests

TASK_NAMES = ["synthetic", "shakespeare-plays", "stackoverflow", "cifar100", "emnist"]
OPEN_ALGORITHMS = sorted(algorithms.ALGORITHMS)
OPEN_AGGREGATORS = sorted(set(aggregators.AGGREGATORS) - {"dp_gaussian", "dp_adaptive"})
SETTINGS = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

text_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
option_values = st.one_of(st.booleans(), st.integers(-10**6, 10**6),
                          st.floats(allow_nan=False), text_values,
                          st.lists(st.integers(0, 9), max_size=3))


def _typed_option_values(build, name: str):
    """Values of the type `build`'s signature gives option `name` (any, when it says none)."""
    import inspect

    from fedjax_core.hyperparameters import expected_type
    kind = expected_type(inspect.signature(build).parameters[name])
    if kind is None:
        return option_values
    base = {bool: st.booleans(), int: st.integers(0, 10**6), str: text_values,
            float: st.one_of(st.integers(0, 1000), st.floats(0, 1e6, allow_nan=False))}[kind[0]]
    return base  # not None: TOML has no null


def _typed_options(build, names):
    """A strategy of option dicts (at least one) with values of their types."""
    return st.lists(st.sampled_from(names), min_size=1, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: _typed_option_values(build, k) for k in keys}))


def _aggregator_ok(name: str, options: dict, clients: int) -> bool:
    try:
        aggregators.check_options(name, options, clients)
    except ValueError:
        return False
    return True


def _value_strategy(key: str):
    kind = configfile.SCHEMA[key].type
    positive = {"rounds", "client.per_round", "client.batch_size", "client.epochs",
                "client.max_steps", "run.chunk_size", "run.keep_checkpoints"}
    if kind == "integer":  # within the option's range (seeds 32 bits, counts in memory)
        high = getattr(configfile.SCHEMA[key].check, "high", None) or 10**9
        return st.integers(1 if key in positive else 0, high)
    if kind == "number":
        return st.one_of(st.integers(0, 1000), st.floats(0, 1e6, allow_nan=False))
    if kind == "boolean":
        return st.booleans()
    if key == "client.sampling":
        return st.sampled_from(["uniform", "poisson"])
    return text_values.filter(lambda s: s.strip() == s)


@st.composite
def valid_configs(draw):
    """(dotted key -> value, the task): a config any valid file may hold."""
    task = draw(st.sampled_from(TASK_NAMES))
    d = {}
    for key in ["rounds", "seed", "client.lr", "client.per_round", "client.batch_size",
                "client.epochs", "client.max_steps", "client.sampling", "server.lr",
                "server.skip_nonfinite_clients", "eval.every", "eval.train_clients",
                "eval.personalize_steps", "run.out", "run.data", "run.chunk_size",
                "run.checkpoint_every", "run.keep_checkpoints", "run.tensorboard"]:
        if draw(st.booleans()):
            d[key] = draw(_value_strategy(key))
    private = draw(st.booleans())
    pool = config.DP_ALGORITHMS if private else OPEN_ALGORITHMS
    if draw(st.booleans()):
        d["algorithm.name"] = draw(st.sampled_from(sorted(pool)))
    algorithm = d.get("algorithm.name", tasks.entry(task).defaults.algorithm)
    valid = [k for k in algorithms.options(algorithm) if k not in algorithms.get(algorithm).needs]
    if valid and draw(st.booleans()):
        d["algorithm.options"] = draw(_typed_options(algorithms.get(algorithm).build, valid))
    if private:
        d["privacy.clip"] = draw(st.floats(1e-3, 1e3))
        d["privacy.delta"] = draw(st.floats(1e-9, 0.5))
        if draw(st.booleans()):
            d["privacy.noise_multiplier"] = draw(st.floats(0, 10))
        else:
            d["privacy.epsilon"] = draw(st.floats(0.1, 100))
        for key, strategy in [("privacy.accountant", st.sampled_from(["rdp", "pld"])),
                              ("privacy.adaptive_clip", st.booleans())]:
            if draw(st.booleans()):
                d[key] = draw(strategy)
        if draw(st.booleans()):
            m = d.get("client.per_round", tasks.entry(task).defaults.clients_per_round)
            d["privacy.noise_cohort_size"] = draw(st.integers(m, m + 1000))
    elif draw(st.booleans()):
        d["aggregator.name"] = draw(st.sampled_from(OPEN_AGGREGATORS))
        valid = list(aggregators.options(d["aggregator.name"]))
        if valid and draw(st.booleans()):
            d["aggregator.options"] = draw(_typed_options(
                aggregators.get(d["aggregator.name"]).build, valid))
        m = d.get("client.per_round", tasks.entry(task).defaults.clients_per_round)
        assume(_aggregator_ok(d["aggregator.name"], d.get("aggregator.options", {}), m))
    if draw(st.booleans()):
        d["task"] = task
    return d, task


def render(d: dict, style: str) -> str:
    """A TOML file holding `d` (dotted key -> value), in sections or with dotted keys."""
    lit = toml_text.literal
    if style == "dotted":
        return "".join(f"{key} = {lit(v)}\n" for key, v in d.items())
    root = [f"{key} = {lit(v)}" for key, v in d.items() if "." not in key]
    sections = collections.defaultdict(list)
    for key, v in d.items():
        if "." in key:
            section, name = key.rsplit(".", 1)
            if isinstance(v, dict):
                sections[key] += [f"{toml_text.show_key((k,))} = {lit(x)}" for k, x in v.items()]
                sections.setdefault(section, [])  # the parent table exists
            else:
                sections[section].append(f"{name} = {lit(v)}")
    out = root[:]
    for section, lines in sections.items():
        out += [f"[{section}]", *lines]
    return "\n".join(out) + "\n"


def expected_config(d: dict, task: str, default_task: str) -> ExperimentConfig:
    options = {configfile.SCHEMA[k].field: (float(v) if configfile.SCHEMA[k].type == "number"
                                            else v) for k, v in d.items()}
    options.pop("task", None)
    return config.resolve(d.get("task", default_task), **options)


def test_property_valid_configs_resolve_and_round_trip(tmp_path):
    count = collections.Counter()

    @SETTINGS
    @given(valid_configs(), st.sampled_from(["sections", "dotted"]), st.data())
    def check(drawn, style, data):
        d, task = drawn
        count["cases"] += 1
        # Some keys go to --set (written as TOML values), overriding a wrong file value.
        set_keys = data.draw(st.lists(st.sampled_from(sorted(d)), unique=True)) if d else []
        in_file = {k: v for k, v in d.items() if k not in set_keys}
        for k in set_keys:
            if configfile.SCHEMA[k].type == "integer":
                in_file[k] = 1  # valid, but overridden
        sets = [f"{k}={toml_text.literal(d[k])}" for k in set_keys]
        path = tmp_path / f"case{count['cases']}.toml"
        path.write_text(render(in_file, style), encoding="utf-8")
        cfg = configfile.resolve_file(path, sets, {}, default_task=task)
        assert cfg == expected_config(d, task, task)
        again = tmp_path / "again.toml"
        again.write_text(configfile.dump(cfg), encoding="utf-8")
        assert configfile.resolve_file(again, [], {}) == cfg

    check()
    print(f"\nhypothesis: {count['cases']} valid configs resolved and round-tripped")
    assert count["cases"] >= 100


WRONG = {
    "integer": st.one_of(text_values, st.floats(allow_nan=False), st.booleans(),
                         st.lists(st.integers(), max_size=2)),
    "number": st.one_of(text_values, st.booleans(), st.lists(st.integers(), max_size=2)),
    "string": st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False)),
    "boolean": st.one_of(st.integers(), text_values, st.floats(allow_nan=False)),
    "table": st.one_of(st.integers(), text_values, st.booleans()),
    "array": st.one_of(st.integers(), text_values, st.booleans(),
                       st.lists(st.integers(), min_size=1, max_size=2)),
}
SCHEMA_PATHS = {tuple(k.split(".")) for k in configfile.SCHEMA} | {
    (s,) for s in ("algorithm", "aggregator", "client", "server", "eval", "privacy", "run")}


@st.composite
def mutated_files(draw):
    """(file text, kind, the key the message must name or None): a config made invalid."""
    d, task = draw(valid_configs())
    d["task"] = task
    kind = draw(st.sampled_from(["wrong type", "unknown key", "deleted bracket",
                                 "random bytes", "edited text"]))
    if kind == "wrong type":
        key = draw(st.sampled_from(sorted(configfile.SCHEMA)))
        d[key] = draw(WRONG[configfile.SCHEMA[key].type])
        return render(d, draw(st.sampled_from(["sections", "dotted"]))).encode(), kind, key
    if kind == "unknown key":
        section = draw(st.sampled_from(["", "client.", "server.", "eval.", "privacy.", "run.",
                                        "algorithm.", "aggregator.", "nosuch."]))
        name = draw(st.text(string.ascii_letters + "_", min_size=1, max_size=10))
        key = section + name
        assume(tuple(key.split(".")) not in SCHEMA_PATHS and key not in d)
        assume(not any(k.startswith(key + ".") for k in d))
        d[key] = draw(option_values)
        return render(d, draw(st.sampled_from(["sections", "dotted"]))).encode(), kind, key
    text = render(d, "sections")
    if kind == "deleted bracket":
        headers = [m.start() for m in re.finditer(r"^\[", text, re.MULTILINE)]
        assume(headers)
        start = draw(st.sampled_from(headers))
        at = draw(st.sampled_from([start, text.index("]\n", start)]))
        return (text[:at] + text[at + 1:]).encode(), kind, None
    if kind == "random bytes":
        return draw(st.binary(max_size=200)), kind, None
    raw = text.encode()
    at = draw(st.integers(0, len(raw)))
    if draw(st.booleans()) and at < len(raw):
        return raw[:at] + raw[at + 1:], kind, None
    return raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:], kind, None


def test_property_mutated_configs_raise_one_line_config_errors(tmp_path):
    count = collections.Counter()

    @SETTINGS
    @given(mutated_files())
    def check(mutated):
        raw, kind, key = mutated
        count[kind] += 1
        path = tmp_path / "bad.toml"
        path.write_bytes(raw)
        try:
            configfile.resolve_file(path, [], {}, default_task="synthetic")
        except ConfigError as e:
            message = str(e)
            assert len(message.splitlines()) == 1, repr(message)
            if kind == "wrong type":
                assert "expects" in message and key in message, message
            elif kind == "unknown key":
                assert "unknown key" in message or "has no option" in message, message
            elif kind == "deleted bracket":
                assert re.search(r"bad\.toml:\d+:\d+: invalid TOML: ", message), message
        else:
            assert kind in ("random bytes", "edited text"), kind  # these may stay valid

    check()
    print(f"\nhypothesis: {sum(count.values())} mutated configs ({dict(count)})")
    assert sum(count.values()) >= 100 and len(count) == 5


def test_property_random_sets_raise_only_one_line_config_errors():
    count = collections.Counter()
    keys = sorted(configfile.SCHEMA) + ["algorithm", "aggregator", "algorithm.options.b2",
                                        "aggregator.options.beta", "client", "nosuch"]

    @SETTINGS
    @given(st.one_of(st.text(max_size=30),
                     st.builds("{}={}".format, st.sampled_from(keys),
                               st.text(st.characters(exclude_categories=["Cs"]), max_size=15))))
    def check(item):
        count["cases"] += 1
        try:
            configfile.resolve_file(None, [item], {}, default_task="synthetic")
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1, repr(str(e))
            count["refused"] += 1

    check()
    print(f"\nhypothesis: {count['cases']} random --set items ({count['refused']} refused)")
    assert count["cases"] >= 100
