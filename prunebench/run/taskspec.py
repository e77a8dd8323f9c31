"""Which lmms-eval task a name means, and where its data comes from.

Real tasks are lmms-eval's own (``gqa``, ``textvqa_val``, ...; friendly aliases below). Any of them
can be pointed at local data (``--task-data pope=/data/pope.parquet``): the task keeps its prompts
and metrics, only ``dataset_path`` changes. prunebench's own generated tasks (the built-in offline
benchmark, tasks/synthetic.py) are an lmms-eval task plus a fixed evaluation set drawn in code:
``synth-gqa`` and ``synth-textvqa`` (our YAMLs in tasks/, GQA's and TextVQA's prompts, exact match)
and ``synth-pope`` (lmms-eval's own ``pope`` on generated images). They take local data too, e.g. a
set re-drawn with another seed by ``prunebench draw-task``. A cell run on local data is another
record: the file's digest is part of its key (:func:`data_setting`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from prunebench.errors import UserError
from prunebench.models.hub import hub_reachable
from prunebench.tasks import GENERATED

ALIASES = {
    "textvqa": "textvqa_val",
    "sqa": "scienceqa_img",
    "scienceqa": "scienceqa_img",
    "mmb": "mmbench_en_dev_static",
    "mmbench": "mmbench_en_dev_static",
    "vqav2": "vqav2_val",
    "seed": "seedbench",
    "mmmu": "mmmu_val",
}
PAPER_TASKS = ["gqa", "textvqa_val", "pope", "mme", "scienceqa_img", "mmbench_en_dev_static", "vqav2_val",
               "seedbench", "mmmu_val"]


FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class TaskError(UserError, ValueError):
    """Unknown task, unreadable task data, or a dataset that cannot be had."""


@functools.lru_cache(maxsize=2)
def task_manager(full: bool = True):
    """lmms-eval's task index: prunebench's tasks and all of lmms-eval's (~3,000 YAML files, some
    seconds to index), or with ``full=False`` prunebench's and POPE's only (the one lmms-eval task a
    generated task reuses), which is all a run of generated tasks needs."""
    import lmms_eval.tasks
    from lmms_eval.tasks import TaskManager

    import prunebench.tasks

    include = [next(iter(prunebench.tasks.__path__))]
    if not full:
        include.append(str(Path(lmms_eval.tasks.__file__).parent / "pope"))
    return TaskManager(verbosity="ERROR", include_path=include, include_defaults=full)


def manager_for(names: list[str]):
    """The task index ``names`` need (``task_manager``)."""
    return task_manager(full=not all(n in GENERATED for n in names))


def canonical(name: str) -> str:
    return ALIASES.get(name.strip(), name.strip())


def check_known(names: list[str]) -> None:
    """Fail before any work if a task name is unknown."""
    known = set(manager_for(names).all_tasks)
    unknown = [n for n in names if n not in GENERATED and n not in known]
    if unknown:
        raise TaskError(
            f"unknown task(s) {', '.join(unknown)}; prunebench's own: {', '.join(GENERATED)}; aliases: "
            f"{', '.join(f'{a}->{t}' for a, t in ALIASES.items())}; or any lmms-eval task name "
            f"(e.g. {', '.join(PAPER_TASKS)}); `prunebench list tasks` lists them"
        )


def check_data_reachable(task: str, data: str | None) -> None:
    """Fail within seconds, not after lmms-eval's retries, when a task's hub dataset is neither
    cached nor reachable."""
    if task in GENERATED or data is not None:
        return
    dataset = base_config(task).get("dataset_path", "")
    if not dataset or os.path.exists(dataset) or "/" not in dataset:
        return
    if dataset_in_cache(dataset):
        return
    from huggingface_hub import constants

    status = hub_status()
    if status != "reachable":
        raise TaskError(
            f"task {task!r} needs the dataset {dataset!r}, which is not in the local cache "
            f"({constants.HF_HUB_CACHE}; HF_HOME={constants.HF_HOME}) and the hub "
            f"{'is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)' if status == 'offline' else 'cannot be reached'}. "
            f"Download it on a connected machine (`hf download --repo-type dataset {dataset}`) and copy "
            f"HF_HOME over, or run the task on local data: --task-data {task}=/path/file.parquet"
        )


def dataset_in_cache(dataset: str) -> bool:
    """A hub dataset has been downloaded into the local Hugging Face cache."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").exists()


def hub_status() -> str:
    """"offline" (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), "reachable" or "unreachable"."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "offline"
    return "reachable" if hub_reachable(constants.ENDPOINT) else "unreachable"


def base_config(task: str) -> dict:
    """The task's YAML config as lmms-eval loads it."""
    from lmms_eval import utils

    generated = {gen.base for gen in GENERATED.values()}
    index = task_manager(full=task not in generated)._task_index[task]
    return utils.load_yaml_config(index["yaml_path"])


def task_spec(name: str, data: str | None, cache_dir: Path) -> str | dict:
    """What to hand lmms-eval: a task name, or a dict overriding a task's dataset."""
    if name in GENERATED and data is not None:
        return _override(GENERATED[name].base, data, alias=name)
    if name in GENERATED:
        gen = GENERATED[name]
        path = cache_dir / f"{name}-{gen.size}-{gen.seed}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            gen.generate(gen.size, gen.seed).to_parquet(str(tmp))
            os.replace(tmp, path)
        return _override(gen.base, str(path), alias=name)
    if data is not None:
        return _override(name, data)
    return name


def _override(task: str, path: str, alias: str | None = None) -> dict:
    fmt = FILE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise TaskError(f"task data {path!r}: unknown file type; use one of {', '.join(FILE_FORMATS)}")
    if not Path(path).exists():
        raise TaskError(f"task data {path!r} does not exist")
    split = base_config(task).get("test_split", "test")
    spec = {"task": task, "dataset_path": fmt, "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(Path(path).resolve())}}}
    if alias:
        spec["task_alias"] = alias
    return spec


def draw_generated(name: str, seed: int, size: int, out: str | Path) -> Path:
    """Write the generated task ``name`` drawn with another ``seed`` (``size`` samples) as a parquet
    file that ``--task-data NAME=PATH`` runs; the evaluation stream stays disjoint from training."""
    if name not in GENERATED:
        raise TaskError(f"{name!r} is not a generated task; generated tasks: {', '.join(GENERATED)}")
    if size <= 0:
        raise TaskError(f"--size {size}: give a positive number of samples")
    out = Path(out)
    if out.suffix != ".parquet":
        raise TaskError(f"--out {str(out)!r}: write a .parquet file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    GENERATED[name].generate(size, seed).to_parquet(str(tmp))
    os.replace(tmp, out)
    return out


def parse_task_data(items: list[str], tasks: list[str]) -> dict[str, str]:
    """``TASK=PATH`` items -> {task: path}: each task among ``tasks``, given once. A generated task
    takes a set drawn with another seed (``prunebench draw-task``) like an lmms-eval task takes its data."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        task, path = canonical(name), path.strip()
        if not eq or not task or not path:
            raise TaskError(f"--task-data {item!r}: write TASK=PATH (e.g. pope=/data/pope.parquet)")
        if task not in tasks:
            raise TaskError(f"--task-data {item!r}: {task} is not among --tasks ({', '.join(tasks)}); add it there "
                            "or drop this --task-data")
        if task in out:
            raise TaskError(f"--task-data {task} given twice ({out[task]!r} and {path!r})")
        out[task] = path
    return out
