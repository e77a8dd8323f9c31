"""Local task data (``--task-data TASK=PATH``), read before any work the way the task will read it.

The file is opened through lmms-eval (the loader a run uses) and its rows counted; then, for the
rows a run evaluates (the first ``--limit``): every question is built by the task's own
``doc_to_text`` (a column it reads but the file lacks is named, with the columns found; an empty
question is refused), the answers of a sample of rows go through the task's own metric where
that metric is local code (POPE refuses an answer that is not yes/no), and the images of a
sample of rows are decoded (a corrupt one is named by its row). The file's sha256 is part of
every record's key (prunebench.run.inputs), so changed rows are a new record, never a stale one.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from dataclasses import dataclass
from pathlib import Path

from prunebench.fingerprint import file_digest
from prunebench.run import taskspec
from prunebench.tasks import GENERATED
from prunebench.run.taskspec import FILE_FORMATS, TaskError

# tasks whose metric is local code (no judge model behind an API): their answers are scored once
# on sampled rows before the run, so a row the metric cannot score fails here, not in a cell
LOCAL_METRICS = ("pope", "gqa", "textvqa_val", "mme", "vqav2_val", "scienceqa_img", "seedbench")
SAMPLED_ROWS = 32  # rows whose images are decoded and answers scored (all questions are built)


@dataclass
class TaskData:
    """A checked ``--task-data`` file."""

    task: str
    path: Path
    sha256: str
    rows: int
    questions: list[tuple[int, str]]  # (row, the text the task builds) for the rows a run evaluates

    def describe(self) -> dict:
        """What a record's provenance says about it."""
        return {"path": str(self.path), "sha256": self.sha256, "rows": self.rows}


def check_task_data(task: str, data: str, limit: int | None) -> TaskData:
    """Open ``data`` as ``task``'s dataset and read the rows a run would; a TaskError names the
    first problem (file, row, column) in one line."""
    path = Path(data)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    where = f"--task-data {task}={data}"
    if fmt is None:
        raise TaskError(f"{where}: unknown file type {path.suffix or '(none)'!r}; use one of {', '.join(FILE_FORMATS)}")
    if not path.exists():
        raise TaskError(f"{where}: the file does not exist")
    if not path.is_file():
        raise TaskError(f"{where}: not a file")
    if path.stat().st_size == 0:
        raise TaskError(f"{where}: the file is empty")
    if fmt == "parquet":
        _check_parquet(path, where)
    config = taskspec.base_config(GENERATED[task].base if task in GENERATED else task)  # a generated task: its base's
    rows = _load(path, fmt, config.get("test_split", "test"), where)
    if len(rows) == 0:
        raise TaskError(f"{where}: the file has no rows")
    _check_columns(config, rows, where)
    built = _build_task(task, str(path), where, fmt)
    docs, plain = built.eval_docs, built.eval_docs_no_media
    evaluated = range(min(limit, len(docs)) if limit else len(docs))
    questions = [(row, _question(built, plain[row], row, where)) for row in evaluated]
    for row in _sample(evaluated):
        _check_answer(built, task, plain[row], row, where)
        _check_image(built, docs, row, where)
    return TaskData(task, path.resolve(), file_digest(path, whole=True), len(docs), questions)


def _check_parquet(path: Path, where: str) -> None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise TaskError(f"{where}: not a readable parquet file ({_first_line(err)})") from None
    if rows == 0:
        raise TaskError(f"{where}: the file has no rows")


def _load(path: Path, fmt: str, split: str, where: str):
    """The rows as the run's loader (``datasets``) reads them, images not decoded; its log lines
    about a bad file are silenced (the error says it in one line)."""
    import datasets
    from datasets.utils import logging as datasets_logging

    datasets.disable_progress_bars()  # the run shows its own progress
    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL + 10)
    try:
        rows = datasets.load_dataset(fmt, data_files={split: str(path)}, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for an unreadable file
        raise TaskError(f"{where}: cannot be read as {fmt} ({_first_line(err)})") from None
    finally:
        datasets_logging.set_verbosity(level)
    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
    return rows


def _check_columns(config: dict, rows, where: str) -> None:
    """Every column the task's hooks read on the first row is in the file."""
    columns = list(rows.column_names)
    raw = config.get("lmms_eval_specific_kwargs")
    kwargs = None if raw is None else {**raw, **raw.get("default", {})}
    missing: list[str] = []
    for name in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        hook = config.get(name)
        if isinstance(hook, str) and "{{" not in hook:  # a column name
            if hook not in columns and hook not in missing:
                missing.append(hook)
        elif callable(hook):  # called as lmms-eval calls it
            takes_kwargs = kwargs is not None and len(inspect.signature(hook).parameters) > 1
            extra = ([""],) if name == "process_results" else (kwargs,) if takes_kwargs else ()
            missing += [c for c in _missing_columns(hook, rows[0], extra) if c not in missing]
    if missing:
        raise TaskError(f"{where}: the file lacks the column(s) {', '.join(missing)} the task reads "
                        f"(columns found: {', '.join(columns)})")


def _build_task(task: str, path: str, where: str, fmt: str):
    """lmms-eval's task object over the file, as a run's cells build it."""
    from lmms_eval.tasks import get_task_dict

    spec = taskspec.task_spec(task, path, cache_dir=Path("."))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            (built,) = get_task_dict([spec], taskspec.manager_for([task])).values()  # one task, keyed by name or alias
            return built
    except Exception as err:  # noqa: BLE001 - lmms-eval's task set-up on a file it cannot use
        raise TaskError(f"{where}: lmms-eval cannot set up {task} on it ({_first_line(err)})") from None


def _question(task, doc: dict, row: int, where: str) -> str:
    text = _call(task.doc_to_text, doc, row, where, "build its question")
    kwargs = task.lmms_eval_specific_kwargs or {}
    question = text if isinstance(text, str) else ""
    question = question.removeprefix(kwargs.get("pre_prompt") or "").removesuffix(kwargs.get("post_prompt") or "")
    if not question.strip():
        raise TaskError(f"{where}: row {row} has an empty question; fill it in or drop the row")
    return text


def _check_answer(task, name: str, doc: dict, row: int, where: str) -> None:
    target = _call(task.doc_to_target, doc, row, where, "read its answer")
    score = task.config.process_results  # the task's own code (lmms-eval's wrapper retries 5 times)
    if task.config.task not in LOCAL_METRICS or not callable(score):
        return
    answer = target[0] if isinstance(target, list) and target else target
    try:
        score(doc, [str(answer)])
    except Exception as err:  # noqa: BLE001 - a task's metric code raises what it raises
        raise TaskError(f"{where}: row {row}: {name}'s metric cannot score its answer {answer!r} "
                        f"({_first_line(err)})") from None


def _check_image(task, docs, row: int, where: str) -> None:
    from PIL import Image

    try:
        doc = docs[row]  # decodes the row's images
        visuals = _call(task.doc_to_visual, doc, row, where, "read its image")
        for visual in visuals if isinstance(visuals, list) else [visuals]:
            if isinstance(visual, Image.Image):
                visual.load()
    except OSError as err:
        raise TaskError(f"{where}: row {row}: its image cannot be decoded ({_first_line(err)})") from None
    if not isinstance(visuals, list) or len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
        raise TaskError(f"{where}: row {row} gives {len(visuals) if isinstance(visuals, list) else 0} images; "
                        "prunebench runs tasks with one image per question")


def _call(hook, doc: dict, row: int, where: str, what: str):
    """One of the task's hooks on a row; its failure names the row."""
    try:
        return hook(doc)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - the task's own code on a malformed row
        raise TaskError(f"{where}: row {row}: the task cannot {what} ({_first_line(err)})") from None


def _missing_columns(hook, doc: dict, extra: tuple = ()) -> list[str]:
    """The columns ``hook(doc, *extra)`` reads that ``doc`` lacks: each KeyError names one; a
    stand-in value lets the hook go on to the next (until it fails otherwise)."""
    probe, missing = dict(doc), []
    for _ in range(16):
        try:
            hook(probe, *extra)
            break
        except KeyError as err:
            name = err.args[0] if err.args else None
            if not isinstance(name, str) or name in probe:
                break
            missing.append(name)
            probe[name] = ""
        except Exception:  # noqa: BLE001 - the stand-in value is not what the hook wanted
            break
    return missing


def _sample(rows: range) -> list[int]:
    """The first half of SAMPLED_ROWS rows, and the rest spread evenly over the others."""
    head = list(rows[: SAMPLED_ROWS // 2])
    rest = rows[SAMPLED_ROWS // 2 :]
    step = max(1, len(rest) // (SAMPLED_ROWS - len(head)) if len(rest) else 1)
    return head + list(rest[::step][: SAMPLED_ROWS - len(head)])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
