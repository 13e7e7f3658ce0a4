"""Read, validate, tokenize and pack in memory; nothing is written here.

`analyze` is the `kubetune validate` pre-flight; `prepare` runs the same analysis and then
writes what it produced, so both report identical numbers.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Iterable, Sequence

from ..config import RunConfig, TaskType
from ..errors import UserError
from ..inputs import check_custom_weights
from .encoding import TemplateRefused, encode, truncate
from .modelinfo import check_chat_template, load_tokenizer, model_max_context, resolve_context_length
from .packing import Sample, pack, packing_efficiency
from .records import Location, Problem, Record
from .report import DataStats, PrepFailed, PrepReport, SplitReport
from .rules import Example, validate
from .sources import read_records

CHUNK = 256  # examples per task sent to a worker process


@dataclass
class PackedSplit:
    """A split ready to write: its samples and which ones share each sequence."""

    report: SplitReport
    samples: list[Sample]
    bins: list[list[int]]


@dataclass
class Analysis:
    report: PrepReport
    splits: dict[str, PackedSplit]  # "train", and "eval" when there is eval data
    tokenizer: Any


def valid_examples(task: TaskType, records: Iterable[Record], report: SplitReport,
                   cap: int) -> list[tuple[Location, Example]]:
    found = []
    for record in records:
        checked = validate(task, record)
        if isinstance(checked, Problem):
            report.add_problem(checked, cap)
        else:
            found.append((record.location, checked))
    return found


# Forked workers load their own tokenizer once: a Rust tokenizer whose thread pool ran in the
# parent must not be reused in a child (the tokenizers library would disable it with a warning).
_worker_tokenizer: Any = None


def _load_worker_tokenizer(model: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model)


def encode_or_refusal(tokenizer: Any, example: Example) -> Sample | str:
    try:
        return encode(tokenizer, example)
    except TemplateRefused as refused:
        return str(refused)


def _encode_in_worker(example: Example) -> Sample | str:
    return encode_or_refusal(_worker_tokenizer, example)


def encode_all(tokenizer: Any, model: str, examples: Sequence[Example], workers: int) -> list[Sample | str]:
    """Tokenize in order; with several workers, in processes that each load the tokenizer."""
    if workers <= 1 or len(examples) < 2 * CHUNK:
        return [encode_or_refusal(tokenizer, example) for example in examples]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes instead of Rust threads
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                             initializer=_load_worker_tokenizer, initargs=(model,)) as pool:
        return list(pool.map(_encode_in_worker, examples, chunksize=CHUNK))


def split_stats(samples: Sequence[Sample], truncated: int, bins: Sequence[Sequence[int]],
                context_length: int) -> DataStats:
    tokens = sum(len(item) for item in samples)
    return DataStats(len(samples), tokens, truncated, len(bins),
                     packing_efficiency(tokens, len(bins), context_length))


def analyze_split(config: RunConfig, split: str, uri: str, tokenizer: Any,
                  context_length: int) -> PackedSplit:
    report = SplitReport(split, uri)
    cap = config.max_reported_errors
    located = valid_examples(config.task_type, read_records(uri, config.task_type), report, cap)
    encoded = encode_all(tokenizer, config.model, [example for _, example in located], config.prep_workers)
    samples, truncated = [], 0
    for (location, _), item in zip(located, encoded):
        if isinstance(item, str):
            report.add_problem(Problem(location, item), cap)
            continue
        kept, cut = truncate(item, context_length)
        samples.append(kept)
        truncated += cut
    if not samples and not report.invalid_records:
        raise UserError(f"{uri}: no records found ({split} data)")
    bins = pack([len(item) for item in samples], context_length)
    report.stats = split_stats(samples, truncated, bins, context_length)
    return PackedSplit(report, samples, bins)


def run_analysis(config: RunConfig) -> Analysis:
    """Everything but the writing; raises PrepFailed (a DataValidationFailed) on bad records."""
    if config.validate_inputs:
        check_custom_weights(config.custom_weights_path)
    tokenizer = load_tokenizer(config.model)
    check_chat_template(config, tokenizer)
    context_length = resolve_context_length(config.context_length, model_max_context(config.model, tokenizer))
    sources = {"train": config.train_data_path}
    if config.eval_data_path:
        sources["eval"] = config.eval_data_path
    splits = {name: analyze_split(config, name, uri, tokenizer, context_length)
              for name, uri in sources.items()}
    report = PrepReport(context_length, splits["train"].report,
                        splits["eval"].report if "eval" in splits else None, config.max_reported_errors)
    if not report.ok:
        raise PrepFailed(report)
    return Analysis(report, splits, tokenizer)


def analyze(config: RunConfig) -> PrepReport:
    """The pre-flight: validate, tokenize and pack in memory, write nothing."""
    return run_analysis(config).report
