"""lmms-eval hooks of prunebench's generated tasks (their data: tasks/synthetic.py)."""

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

_normalise = EvalAIAnswerProcessor()


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def gqa_doc_to_text(doc, lmms_eval_specific_kwargs):
    kwargs = lmms_eval_specific_kwargs
    return f"{kwargs['pre_prompt']}{doc['question']}{kwargs['post_prompt']}"


def textvqa_doc_to_text(doc, lmms_eval_specific_kwargs):
    kwargs = lmms_eval_specific_kwargs  # as lmms-eval's TextVQA: the question capitalised
    return f"{kwargs['pre_prompt']}{doc['question'].capitalize()}{kwargs['post_prompt']}"


def process_results(doc, results):
    """Exact match after the VQA answer normalisation (case, punctuation, articles, number words)."""
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}
