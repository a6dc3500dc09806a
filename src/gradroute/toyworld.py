"""Moved to :mod:`gradroute.experiments.toyworld`; this alias will be removed."""

from .experiments.toyworld import (
    EXPLOITABLE,
    HACK,
    HACKER_TAG,
    HELDOUT,
    HONEST_TAG,
    LETTERS,
    TASKS,
    TRAIT,
    Example,
    buggy_grader,
    evaluate,
    example,
    examples,
    fixed_grader,
    honest_grader,
    is_hack,
    is_solved,
    is_trait,
    make_reward,
    persona_probe_texts,
    pretraining_corpus,
    rates,
    rl_dataset,
    sample,
)

__all__ = ["EXPLOITABLE", "HACK", "HACKER_TAG", "HELDOUT", "HONEST_TAG", "LETTERS", "TASKS", "TRAIT", "Example",
           "buggy_grader", "evaluate", "example", "examples", "fixed_grader", "honest_grader", "is_hack", "is_solved",
           "is_trait", "make_reward", "persona_probe_texts", "pretraining_corpus", "rates", "rl_dataset", "sample"]
