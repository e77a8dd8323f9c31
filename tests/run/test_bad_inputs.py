"""The battery of bad inputs: each is refused through the CLI with exit 2 and one line on stderr
naming the problem, no traceback, and nothing written to the store (or anywhere else).

Nearly all fail in the validation pass, before any model loads; those that need the model's
depth, width or positions load the built-in tiny model (5 MB) and fail before any cell runs.
The list below is the documentation of what is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prunebench.commands.main import main

pytest.importorskip("lmms_eval")

# every run case starts from this command line; a case replaces flags it names and adds the rest
BASE = ["run", "--model", "builtin:tiny-llava", "--tasks", "synth-pope", "--methods", "none,random", "--budgets", "64",
        "--limit", "2", "--max-new-tokens", "2", "--dtype", "float32", "--results", "{store}"]
POPE = ["--tasks", "pope"]


def bad(case_id: str, says: str, *argv: str, env: dict[str, str] | None = None):
    """A bad input: ``argv`` (a run case's changes to BASE, or a whole command line for another
    subcommand; ``{name}`` is a file the ``files`` fixture made) and what its one line must say."""
    return pytest.param(list(argv), says, env or {}, id=case_id)


CASES = [
    # -- methods -----------------------------------------------------------------------------
    bad("methods-empty", r"no method given; valid choices", "--methods", ""),
    bad("methods-blank", r"no method given", "--methods", "  "),
    bad("method-unknown", r"unknown method 'nosuch'; valid choices: .*fastv", "--methods", "nosuch"),
    bad("method-unknown-second", r"unknown method 'nosuch'", "--methods", "none,nosuch"),
    bad("method-colon-no-options", r"'fastv:': no options after ':'", "--methods", "fastv:"),
    bad("method-trailing-commas", r"empty item in the method list 'fastv:layer=2,,'", "--methods", "fastv:layer=2,,"),
    bad("method-leading-comma", r"empty item in the method list", "--methods", ",fastv"),
    bad("method-trailing-comma", r"empty item in the method list", "--methods", "fastv,"),
    bad("method-double-comma", r"empty item in the method list", "--methods", "none,,fastv"),
    bad("method-option-unknown", r"method 'fastv' has no option 'nosuch'; its options: layer=2", "--methods", "fastv:nosuch=1"),
    bad("method-option-not-int", r"option fastv:layer='x': expected an integer", "--methods", "fastv:layer=x"),
    bad("method-option-fraction-for-int", r"option fastv:layer='1.5'", "--methods", "fastv:layer=1.5"),
    bad("method-option-no-value-sign", r"malformed option 'layer' for method 'fastv'", "--methods", "fastv:layer"),
    bad("method-option-no-key", r"malformed option '=3' for method 'fastv'", "--methods", "fastv:=3"),
    bad("method-option-before-name", r"option 'layer=3' comes before any method name", "--methods", "layer=3,fastv"),
    bad("fastv-layer-0", r"fastv: layer=0; FastV scores with layer K-1", "--methods", "fastv:layer=0"),
    bad("fastv-layer-negative", r"fastv: layer=-1", "--methods", "fastv:layer=-1"),
    bad("fastv-ratio-above-1", r"fastv: ratio=1.5 is the dropped fraction", "--methods", "fastv:ratio=1.5"),
    bad("fastv-positions-unknown", r"option fastv:positions='sideways': must be one of", "--methods", "fastv:positions=sideways"),
    bad("random-seed-not-int", r"option random:seed='x': expected an integer", "--methods", "random:seed=x"),
    bad("dart-layer-0", r"dart: layer=0", "--methods", "dart:layer=0"),
    bad("dart-pivots-negative", r"dart: pivot_image=-1", "--methods", "dart:pivot_image=-1"),
    bad("dart-pivots-zero", r"need >= 0 each, one > 0", "--methods", "dart:pivot_image=0,pivot_text=0"),
    bad("pyramiddrop-layers-decreasing", r"pyramiddrop: layers=\(8, 4\) must be strictly increasing", "--methods",
        "pyramiddrop:layers=8/4"),
    bad("pyramiddrop-ratios-count", r"pyramiddrop: 1 ratios for 3 stage layers", "--methods", "pyramiddrop:ratios=0.5"),
    bad("sparsevlm-version-unknown", r"option sparsevlm:version='3': must be one of 1.5, 2.0", "--methods",
        "sparsevlm:version=3"),
    bad("sparsevlm-recycle-top", r"sparsevlm: recycle_top=2.0 must lie in \(0, 1\]", "--methods", "sparsevlm:recycle_top=2"),
    bad("visionzip-layer-positive", r"visionzip: layer=3; give the vision layer as a negative index", "--methods",
        "visionzip:layer=3"),
    bad("visionzip-contextual-negative", r"visionzip: contextual=-1 must be >= 0", "--methods", "visionzip:contextual=-1"),
    bad("divprune-space-unknown", r"option divprune:space='pixels': must be one of projected, vision", "--methods",
        "divprune:space=pixels"),
    bad("method-twice", r"--methods: fastv given twice", "--methods", "fastv,fastv"),
    bad("method-twice-same-options", r"--methods: fastv:layer=3 given twice", "--methods", "fastv:layer=3,fastv:layer=3"),
    # -- checkpoints of the learned selectors -------------------------------------------------
    bad("ckpt-missing", r"autoselect checkpoint directory '/nonexistent/ckpt' does not exist", "--methods",
        "autoselect:ckpt=/nonexistent/ckpt"),
    bad("ckpt-is-a-file", r"autoselect checkpoint directory .* does not exist", "--methods", "autoselect:ckpt={file}"),
    bad("ckpt-no-config", r"is not a autoselect checkpoint: it has no config.json", "--methods", "autoselect:ckpt={empty_dir}"),
    bad("ckpt-config-corrupt", r"config.json is corrupt \(not valid JSON", "--methods", "autoselect:ckpt={ckpt_bad_config}"),
    bad("ckpt-config-not-ours", r"is not a prunebench selector config", "--methods", "autoselect:ckpt={ckpt_foreign_config}"),
    bad("ckpt-other-kind", r"holds a 'gumbel' checkpoint, not 'autoselect'", "--methods", "autoselect:ckpt={ckpt_gumbel}"),
    bad("ckpt-no-weights", r"has a config but no model.safetensors", "--methods", "autoselect:ckpt={ckpt_no_weights}"),
    bad("ckpt-weights-corrupt", r"model.safetensors is corrupt or not a safetensors file", "--methods",
        "autoselect:ckpt={ckpt_bad_weights}"),
    bad("ckpt-other-width", r"was trained on vision features 32 wide .*this model's vision features are 64 wide", "--methods",
        "none,autoselect:ckpt={ckpt_width_32}"),
    # -- budgets ------------------------------------------------------------------------------
    bad("budgets-empty", r"--budgets '': give a comma-separated list with no empty item", "--budgets", ""),
    bad("budgets-empty-item", r"--budgets '64,,32': give a comma-separated list with no empty item", "--budgets", "64,,32"),
    bad("budgets-trailing-comma", r"no empty item", "--budgets", "64,"),
    bad("budget-twice", r"--budgets '64,64': 64 given twice", "--budgets", "64,64"),
    bad("budget-zero", r"budget K=0: K must be a positive number of tokens", "--budgets", "0"),
    bad("budget-negative", r"budget K=-5: K must be a positive number", "--budgets", "-5"),
    bad("budget-word", r"cannot read budget 'abc'", "--budgets", "abc"),
    bad("budget-percent-above-100", r"budget fraction 1.5: must lie in \(0, 1\]", "--budgets", "150%"),
    bad("budget-percent-zero", r"budget fraction 0.0: must lie in \(0, 1\]", "--budgets", "0%"),
    bad("budget-fraction-above-1", r"budget fraction 1.5", "--budgets", "1.5"),
    bad("budget-nan", r"budget fraction nan", "--budgets", "nan"),
    bad("budget-above-visual-tokens", r"K=600 exceeds the 576 visual tokens", "--budgets", "600"),
    # -- tasks and --task-data on the command line --------------------------------------------
    bad("tasks-empty", r"--tasks '': give a comma-separated list with no empty item", "--tasks", ""),
    bad("tasks-empty-item", r"no empty item", "--tasks", "synth-pope,,synth-gqa"),
    bad("task-twice", r"synth-pope given twice", "--tasks", "synth-pope,synth-pope"),
    bad("task-twice-by-alias", r"textvqa_val given twice", "--tasks", "textvqa,textvqa_val"),
    bad("task-unknown", r"unknown task\(s\) nosuchtask; prunebench's own: synth-gqa", "--tasks", "nosuchtask"),
    bad("task-unknown-second", r"unknown task\(s\) nosuch\b", "--tasks", "synth-pope,nosuch"),
    bad("task-dataset-not-cached", r"task 'gqa' needs the dataset .* which is not in the local cache .*HF_HOME.*"
        r"--task-data gqa=", "--tasks", "gqa", env={"HF_DATASETS_OFFLINE": "1"}),
    bad("task-data-no-equals", r"--task-data 'pope': write TASK=PATH", *POPE, "--task-data", "pope"),
    bad("task-data-no-task", r"write TASK=PATH", *POPE, "--task-data", "={pope}"),
    bad("task-data-no-path", r"write TASK=PATH", *POPE, "--task-data", "pope="),
    bad("task-data-task-not-run", r"pope is not among --tasks \(synth-pope\)", "--task-data", "pope={pope}"),
    bad("task-data-twice", r"--task-data pope given twice", *POPE, "--task-data", "pope={pope}", "--task-data",
        "pope={pope}"),
    # -- task data files (opened and read as the task reads them, before any model loads) ----
    bad("data-missing", r"--task-data pope=.*missing.parquet: the file does not exist", *POPE, "--task-data",
        "pope={tmp}/missing.parquet"),
    bad("data-missing-second-task", r"--task-data mme=.*missing.parquet: the file does not exist", "--tasks", "pope,mme",
        "--task-data", "pope={pope}", "--task-data", "mme={tmp}/missing.parquet"),
    bad("data-is-a-directory", r"--task-data pope=.*: not a file", *POPE, "--task-data", "pope={dir_parquet}"),
    bad("data-unknown-suffix", r"unknown file type '.txt'; use one of .parquet", *POPE, "--task-data", "pope={file}"),
    bad("data-no-suffix", r"unknown file type '\(none\)'", *POPE, "--task-data", "pope={no_suffix}"),
    bad("data-empty-file", r"--task-data pope=.*empty_parquet.parquet: the file is empty", *POPE, "--task-data", "pope={empty_parquet}"),
    bad("data-not-parquet", r"not a readable parquet file \(ArrowInvalid", *POPE, "--task-data", "pope={text_parquet}"),
    bad("data-zero-rows", r"zero_rows.parquet: the file has no rows", *POPE, "--task-data", "pope={zero_rows}"),
    bad("data-lacks-question", r"lacks the column\(s\) question the task reads \(columns found: question_id, answer, "
        r"category, image\)", *POPE, "--task-data", "pope={no_question}"),
    bad("data-lacks-question-and-answer", r"lacks the column\(s\) (question, answer|answer, question)", *POPE,
        "--task-data", "pope={no_question_answer}"),
    bad("data-lacks-image", r"lacks the column\(s\) image the task reads", *POPE, "--task-data", "pope={no_image}"),
    bad("data-empty-question", r"row 2 has an empty question", *POPE, "--task-data", "pope={empty_question}", "--limit", "6"),
    bad("data-blank-question", r"row 1 has an empty question", *POPE, "--task-data", "pope={blank_question}"),
    bad("data-null-question", r"row 1: the task cannot build its question \(AttributeError", *POPE, "--task-data",
        "pope={null_question}"),
    bad("data-null-question-first-row", r"lmms-eval cannot set up pope on it \(AttributeError", *POPE, "--task-data",
        "pope={null_question_row0}"),
    bad("data-answer-not-scorable", r"row 1: pope's metric cannot score its answer 'maybe' \(AssertionError\)", *POPE,
        "--task-data", "pope={bad_answer}"),
    bad("data-answer-number", r"row 0: pope's metric cannot score its answer 1", *POPE, "--task-data",
        "pope={number_answer}"),
    bad("data-corrupt-image", r"row 3: its image cannot be decoded \(UnidentifiedImageError", *POPE, "--task-data",
        "pope={corrupt_image}", "--limit", "6"),
    bad("data-image-is-text", r"row 0: the task cannot read its image \(AttributeError", *POPE, "--task-data",
        "pope={text_image}"),
    bad("data-json-broken", r"cannot be read as json", *POPE, "--task-data", "pope={broken_json}"),
    bad("data-jsonl-without-images", r"lacks the column\(s\) image", *POPE, "--task-data", "pope={jsonl_no_image}"),
    bad("data-csv-without-images", r"lacks the column\(s\) image", *POPE, "--task-data", "pope={csv_no_image}"),
    bad("data-question-too-long", r"row 0: the prompt is \d+ tokens \(image tokens included\), more than the model's "
        r"2048 positions", *POPE, "--task-data", "pope={long_question}"),
    bad("data-later-row-too-long", r"row 3: the prompt is \d+ tokens", *POPE, "--task-data", "pope={long_question_row3}",
        "--limit", "4"),
    # -- numbers and plain flags ---------------------------------------------------------------
    bad("limit-zero", r"--limit 0: give a positive number of samples", "--limit", "0"),
    bad("limit-negative", r"--limit -3: give a positive number", "--limit", "-3"),
    bad("limit-not-a-number", r"argument --limit: invalid int value: 'abc' \(see `prunebench run --help`\)", "--limit", "abc"),
    bad("limit-without-value", r"argument --limit: expected one argument", "--limit"),
    bad("batch-size-zero", r"--batch-size 0: must be positive", "--batch-size", "0"),
    bad("batch-size-negative", r"--batch-size -1: must be positive", "--batch-size", "-1"),
    bad("max-new-tokens-zero", r"--max-new-tokens 0: must be positive", "--max-new-tokens", "0"),
    bad("vision-cache-negative", r"--vision-cache-mb -1: give 0 \(off\)", "--vision-cache-mb", "-1"),
    bad("seed-not-a-number", r"argument --seed: invalid int value: 'x'", "--seed", "x"),
    bad("unknown-flag", r"unrecognized arguments: --nosuch", "--nosuch"),
    bad("misspelt-flag", r"unrecognized arguments: --bugdets 64", "--bugdets", "64"),
    bad("dtype-unknown", r"--dtype float64: unknown; valid choices: auto, float32", "--dtype", "float64"),
    bad("dtype-empty", r"--dtype : unknown", "--dtype", ""),
    bad("device-unknown", r"--device 'tpu': unknown device; valid: auto, cpu, cuda, cuda:N, mps", "--device", "tpu"),
    bad("device-empty", r"--device '': unknown device", "--device", ""),
    bad("device-bad-index", r"--device 'cuda:x': unknown device", "--device", "cuda:x"),
    # -- the results store ---------------------------------------------------------------------
    bad("results-empty", r"--results '': give a results folder", "--results", ""),
    bad("results-under-a-file", r"results directory .* is not writable: .*file.txt' is a file, not a folder", "--results",
        "{file}/results"),
    bad("results-is-a-file", r"results directory .*file.txt' is not writable: .* is a file", "--results", "{file}"),
    bad("results-model-folder-is-a-file", r"builtin-tiny-llava.* is not writable: .* is a file, not a folder",
        "--results", "{store_with_file}"),
    # -- models --------------------------------------------------------------------------------
    bad("model-random-unknown", r"unknown random model 'random:huge'; valid choices", "--model", "random:huge"),
    bad("model-builtin-unknown", r"unknown built-in model 'builtin:nosuch'; valid choices: builtin:tiny-llava", "--model",
        "builtin:nosuch"),
    bad("model-hub-id-not-cached", r"cannot load hub id 'nosuch-org/nosuch-model'", "--model", "nosuch-org/nosuch-model",
        env={"HF_HUB_OFFLINE": "1"}),
    bad("model-path-missing", r"cannot load local directory '/nonexistent/model': no such directory", "--model", "/nonexistent/model"),
    bad("model-dir-without-config", r"has no config.json: not a Hugging Face model folder", "--model", "{empty_dir}"),
    bad("model-dir-config-corrupt", r"config.json is not a valid model config", "--model", "{model_bad_config}"),
    bad("model-dir-unsupported-type", r"is a BertConfig, which prunebench has no adapter for; supported architectures",
        "--model", "{model_bert}"),
    bad("model-dir-without-weights", r"has no \*.safetensors weights", "--model", "{model_no_weights}"),
    bad("model-dir-weights-corrupt", r"model.safetensors is corrupt or not a safetensors file", "--model",
        "{model_bad_weights}"),
    # -- schedules against the model (after loading it, before any cell) -----------------------
    bad("fastv-layer-beyond-model", r"fastv:layer=99 at budget 64 .*4 decoder layers\): method 'fastv' prunes at layer 99",
        "--methods", "none,fastv:layer=99"),
    bad("dart-layer-beyond-model", r"dart:layer=99 at budget 64 .* prunes at layer 99", "--methods", "none,dart:layer=99"),
    bad("pyramiddrop-default-layers", r"pyramiddrop at budget 64 .*outside this 4-layer decoder", "--methods", "none,pyramiddrop"),
    bad("sparsevlm-default-layers", r"sparsevlm at budget 64 .*4 decoder layers", "--methods", "none,sparsevlm"),
    # -- other subcommands ---------------------------------------------------------------------
    bad("command-unknown", r"argument COMMAND: invalid choice: 'nosuch'", "nosuch"),
    bad("list-unknown", r"argument what: invalid choice: 'nosuch'", "list", "nosuch"),
    bad("report-store-missing", r"results folder '.*nowhere' does not exist", "report", "--results", "{tmp}/nowhere"),
    bad("report-store-empty", r"no records in", "report", "--results", "{empty_dir}"),
    bad("report-strict-unreadable-record", r"is not a readable record .*--strict: 1 unreadable record file", "report",
        "--strict", "--results", "{store_truncated}"),
    bad("report-format-unknown", r"unknown format pdf; valid formats: md", "report", "--results", "{tiny_store}",
        "--format", "pdf"),
    bad("report-bootstrap-zero", r"--bootstrap 0: need at least 1 replicate", "report", "--results", "{tiny_store}",
        "--bootstrap", "0"),
    bad("report-limit-word", r"--limit 'abc': give a number of samples or 'full'", "report", "--results", "{tiny_store}",
        "--limit", "abc"),
    bad("report-model-unknown", r"unknown --model nosuch; models in", "report", "--results", "{tiny_store}", "--model",
        "nosuch"),
    bad("report-out-is-a-file", r"--out .*file.txt' is not writable: .* is a file, not a folder", "report", "--results",
        "{tiny_store}", "--out", "{file}"),
    bad("report-out-under-a-file", r"--out .*file.txt/tables' is not writable", "report", "--results", "{tiny_store}",
        "--out", "{file}/tables"),
    bad("report-compare-one-name", r"argument --compare: expected 2 arguments", "report", "--results", "{tiny_store}",
        "--compare", "fastv"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The bad (and a few good) files the cases name, made once."""
    import datasets
    from prunebench.tasks.synthetic import task_dataset
    from support.stores import write_tiny_store

    from prunebench.training.selectors import build_selector, save_selector

    tmp = tmp_path_factory.mktemp("battery")
    out = {"tmp": str(tmp)}

    def path(name: str) -> Path:
        out[name.split(".")[0]] = str(tmp / name)
        return tmp / name

    pope = task_dataset("synth-pope", 6, seed=5)
    pope.to_parquet(str(path("pope.parquet")))

    def edited(name: str, column: str, row: int, value) -> None:
        rows = pope.to_list()
        rows[row][column] = value
        datasets.Dataset.from_list(rows, features=pope.features).to_parquet(str(path(name)))

    pope.remove_columns(["question"]).to_parquet(str(path("no_question.parquet")))
    pope.remove_columns(["question", "answer"]).to_parquet(str(path("no_question_answer.parquet")))
    pope.remove_columns(["image"]).to_parquet(str(path("no_image.parquet")))
    pope.select([]).to_parquet(str(path("zero_rows.parquet")))
    edited("empty_question.parquet", "question", 2, "")
    edited("blank_question.parquet", "question", 1, "  \n ")
    edited("null_question.parquet", "question", 1, None)
    edited("null_question_row0.parquet", "question", 0, None)
    edited("bad_answer.parquet", "answer", 1, "maybe")
    edited("corrupt_image.parquet", "image", 3, {"bytes": b"not an image", "path": None})
    edited("long_question.parquet", "question", 0, " ".join(["word"] * 20000))
    edited("long_question_row3.parquet", "question", 3, " ".join(["word"] * 3000))
    features = pope.features.copy()
    features["answer"] = datasets.Value("int64")
    datasets.Dataset.from_list([{**r, "answer": 1} for r in pope.to_list()], features=features).to_parquet(
        str(path("number_answer.parquet")))
    rows = pope.remove_columns(["image"]).to_list()
    datasets.Dataset.from_list([{**r, "image": "no/such/file.png"} for r in rows]).to_parquet(str(path("text_image.parquet")))
    path("broken_json.json").write_text('[{"question": "is there')
    path("jsonl_no_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_csv(str(path("csv_no_image.csv")))
    path("empty_parquet.parquet").touch()
    path("text_parquet.parquet").write_text("this is not parquet")
    path("no_suffix").write_text("x")
    path("dir_parquet.parquet").mkdir()
    path("file.txt").write_text("a file, not a folder")
    path("empty_dir").mkdir()

    # selector checkpoints
    shipped = Path(__file__).resolve().parents[2] / "prunebench" / "models" / "assets"
    save_selector(path("ckpt_width_32"), build_selector("autoselect", vision_width=32))
    save_selector(path("ckpt_gumbel"), build_selector("gumbel", vision_width=64, n_tokens=576))
    save_selector(path("ckpt_no_weights"), build_selector("autoselect", vision_width=64))
    (tmp / "ckpt_no_weights" / "model.safetensors").unlink()
    save_selector(path("ckpt_bad_weights"), build_selector("autoselect", vision_width=64))
    (tmp / "ckpt_bad_weights" / "model.safetensors").write_bytes(b"\x00" * 64)
    path("ckpt_bad_config").mkdir()
    (tmp / "ckpt_bad_config" / "config.json").write_text('{"format": "prunebench-sel')
    path("ckpt_foreign_config").mkdir()
    (tmp / "ckpt_foreign_config" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert (shipped / "autoselect-tiny-llava-k64" / "config.json").is_file()

    # model folders
    llava_config = (shipped / "tiny-llava" / "config.json").read_text()
    for name, config, weights in [("model_bad_config", '{"model_type": "llava", ', b"x"),
                                  ("model_bert", json.dumps({"model_type": "bert"}), b"x"),
                                  ("model_no_weights", llava_config, None),
                                  ("model_bad_weights", llava_config, b"\x00" * 64)]:
        path(name).mkdir()
        (tmp / name / "config.json").write_text(config)
        if weights is not None:
            (tmp / name / "model.safetensors").write_bytes(weights)

    # stores
    write_tiny_store(path("tiny_store"))
    path("store_truncated").mkdir()
    (tmp / "store_truncated" / "m" / "t").mkdir(parents=True)
    (tmp / "store_truncated" / "m" / "t" / "none__all__full__0000.json").write_text('{"key": {"model": "m", "met')
    path("store_with_file").mkdir()
    (tmp / "store_with_file" / "builtin-tiny-llava").write_text("a file where the model's folder goes")
    return out


def command_line(argv: list[str], files: dict[str, str], store: Path) -> list[str]:
    names = {**files, "store": str(store)}
    argv = [a.format(**names) for a in argv]
    if argv and not argv[0].startswith("-") and argv[0] != "run" and argv[0] != "":
        return argv  # another subcommand, given whole
    line = [a.format(**names) for a in BASE]
    i = 0
    while i < len(argv):
        flag = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        value = argv[i + 1] if takes_value else None
        if flag in line and flag != "--task-data" and value is not None:
            line[line.index(flag) + 1] = value
        else:
            line += [flag] if value is None else [flag, value]
        i += 2 if value is not None else 1
    return line


def written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("argv,says,env", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, says, env, files, tmp_path, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    line = command_line(argv, files, store)
    before = {p: p.stat().st_mtime_ns for p in written(Path(files["tmp"]))}
    assert main(line) == 2, line
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert re.match(r"prunebench( \w+)?: error: ", lines[0]), lines[0]
    assert re.search(says, lines[0]), lines[0]
    assert written(store) == [] and written(cwd) == []
    assert {p: p.stat().st_mtime_ns for p in written(Path(files["tmp"]))} == before  # the inputs untouched, no new file


def test_the_battery_covers_at_least_100_bad_inputs():
    assert len(CASES) >= 100 and len({case.id for case in CASES}) == len(CASES)
