"""`stepdpo mine`: the policy's own step pairs (Step-DPO's data pipeline, with open parts).

For each problem: sample K solutions, grade them (math-verify); for each wrong one, locate its first wrong step
* `--locate rollout` (Math-Shepherd's estimate): from the prefix ending at step k, sample M continuations; the
  first step after which none reaches the right answer is the error (`--error-rule first_zero`), or, with
  `--error-rule max_drop`, the step up to that one whose success rate falls most from the prefix before it;
* `--locate prm`: a process reward model through the `score` backends (hf or vLLM): the first step whose reward
  is below `--prm-threshold`;
* `--locate equations`: the first step that states a false equation (`47 + 38 = 114`, checked exactly by
  stepdpo.generate.equations): an exact verifier of computation errors, for arithmetic and GSM8K-style solutions.
  Its samples are the wrong ones and the right ones that reached their answer through a false equation; a wrong
  sample with no false equation (a wrong operation, a misread problem) is not located, and a chosen step must not
  state a false equation either;
then take M continuations from the prefix before that step: those that reach the right answer give the chosen
steps (their first step), the located step is the rejected one. Pairs are in the one schema, with provenance
(sample ids, locate method, rollout success rates), deduplicated. Every generation goes through one cache
(OUT/mine_cache.jsonl), so a killed server or process loses nothing and a re-run continues.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stepdpo.data.pairs import make_pair, write_jsonl
from stepdpo.generate.answers import equivalent, locate_answer, parse_answer
from stepdpo.generate.equations import step_verdict
from stepdpo.generate.generate import (PolicyOptions, SampleCache, VLLMGenerator, make_units, open_policy,
                                      run_generation, with_settings)
from stepdpo.generate.problems import Problem, read_problems
from stepdpo.errors import StepdpoError
from stepdpo.options import REQUIRED, check, check_choice, opt
from stepdpo.reward.vllm import VLLMError


class MineError(StepdpoError, RuntimeError):
    """A server failed mid-run; every generation so far is cached."""


ERROR_RULES = ("first_zero", "max_drop")
LOCATORS = ("rollout", "prm", "equations")


def check_solution_sampling(sample_temperature: float | None, samples: int) -> None:
    """--sample-temperature and --samples, for `mine` and for `stepdpo loop` (which checks them before its run)."""
    check(sample_temperature is None or sample_temperature >= 0, "sample_temperature",
          f"{sample_temperature}: a temperature >= 0 (0: greedy)")
    check(sample_temperature != 0 or samples == 1, "samples",
          f"{samples} greedy solutions per problem would be one solution {samples} times: with "
          "--sample-temperature 0 set --samples 1")


@dataclass
class MineOptions(PolicyOptions):
    problems: str = opt(REQUIRED, "Training problems with reference answers (never the held-out ones).")
    model: str = opt(REQUIRED, "The policy (after `sft`): a model directory or hub id.")
    out: str = opt(REQUIRED, "Output directory: pairs.jsonl, solved.jsonl, report.json, mine_cache.jsonl.")
    samples: int = opt(4, "K: solutions sampled per problem.")
    rollouts: int = opt(4, "M: continuations sampled from a prefix (to locate an error, and to correct it).")
    locate: str = opt("rollout", "rollout: Math-Shepherd's estimate from continuations; prm: a process reward model; "
                      "equations: the first step stating a false equation (exact; for arithmetic and GSM8K-style "
                      "solutions: it examines right answers reached through a false equation too, and never takes a "
                      "chosen step with one).", choices=LOCATORS)
    error_rule: str = opt("first_zero", "--locate rollout: which step is the error. first_zero: the first step after "
                          "which no continuation reaches the answer (Math-Shepherd's hard estimate). max_drop: among "
                          "the steps up to that one, the step whose success rate falls most from the prefix before "
                          "it (the most negative process advantage, as in Setlur et al. 2024, arXiv:2410.08146): "
                          "robust when a wrong step is still followed by a lucky right answer.",
                          choices=ERROR_RULES)
    max_wrong: int = opt(2, "Wrong solutions examined per problem (with --locate equations, right ones with a false "
                         "equation count too).")
    chosen_min_success: float = opt(0.5, "A chosen step must itself lead to the right answer: M continuations after it "
                                    "must reach it at least this often (a correct answer reached through a wrong step "
                                    "by luck is not a chosen step). 0 turns the check off.")
    temperature: float = opt(0.8, "Sampling temperature (the continuations, and the K solutions unless "
                             "--sample-temperature says otherwise).")
    sample_temperature: float | None = opt(None, "Temperature of the K solutions that are examined (default: "
                                           "--temperature). 0: the policy's greedy solution (with --samples 1), so "
                                           "every pair sits at an error greedy decoding makes, which is what a greedy "
                                           "evaluation measures; the continuations that locate and correct it keep "
                                           "--temperature.")
    max_new_tokens: int = opt(128, "Most tokens per solution or continuation.")
    batch_size: int = opt(32, "Prompts per forward pass / per request.")
    reward_model: str | None = opt(None, "--locate prm: the process reward model.")
    reward_backend: str = opt("hf", "--locate prm: hf or vllm (servers at --reward-url).", choices=("hf", "vllm"))
    reward_url: list[str] = opt(factory=list, help="--locate prm with the vllm backend: the PRM server URL(s).")
    prm_threshold: float = opt(0.5, "--locate prm: the first step whose reward is below this is the error.")
    prm_step_tag: str = opt(" ки", "--locate prm: the PRM's step tag.")
    prm_head: str = opt("lm", "--locate prm: lm (good/bad token logits) or classifier.", choices=("lm", "classifier"))

    def __post_init__(self):
        self._check_policy()
        check_choice(self.locate, "locate", LOCATORS)
        check_choice(self.error_rule, "error_rule", ERROR_RULES)
        check(self.samples >= 1 and self.rollouts >= 1 and self.max_wrong >= 1, "samples",
              "samples, rollouts and max_wrong must be >= 1")
        check(self.locate != "prm" or bool(self.reward_model), "reward_model", "--locate prm needs --reward-model")
        check(self.reward_backend != "vllm" or bool(self.reward_url), "reward_url",
              "--reward-backend vllm needs --reward-url")
        check_solution_sampling(self.sample_temperature, self.samples)

    def solution_settings(self) -> dict:
        """The K solutions' sampling settings: --sample-temperature in place of --temperature."""
        settings = self.sampling_settings()
        if self.sample_temperature is not None:
            settings["temperature"] = float(self.sample_temperature)  # 0 and 0.0 are one cache key
        return settings


class _Sampler:
    """Draws samples through one generator and one cache; counts the generations spent."""

    def __init__(self, options: MineOptions, model=None):
        self.settings = options.sampling_settings()
        self.tokenizer, self.style, self.identity, self.generator = open_policy(options, self.settings, model)
        # the K solutions: their own settings, and so their own cache keys and seeds
        self.solution_settings = options.solution_settings()
        self.solutions_apart = self.solution_settings != self.settings
        self.solution_identity = (with_settings(self.identity, self.solution_settings) if self.solutions_apart
                                  else self.identity)
        self.cache = SampleCache(Path(options.out) / "mine_cache.jsonl")
        self.batch_size, self.progress = options.batch_size, options.progress
        self.generated = self.cache_hits = 0

    def draw(self, requests: list[tuple[Problem, tuple[str, ...]]], n: int, solutions: bool = False
             ) -> list[list[dict]]:
        """n samples after each (problem, prefix): continuations, or with `solutions` the K whole solutions."""
        settings, identity = ((self.solution_settings, self.solution_identity) if solutions
                              else (self.settings, self.identity))
        groups = [make_units([p], self.tokenizer, self.style, n, identity, prefix) for p, prefix in requests]
        units = [u for g in groups for u in g]
        counts = run_generation(units, self.generator, settings, self.cache, batch_size=self.batch_size,
                                progress=self.progress)
        self.generated += counts["generated"]
        self.cache_hits += counts["cache_hits"]
        return [[self.cache.rows[u.key] for u in g] for g in groups]


def _reaches(problem_gold, prefix: tuple[str, ...], text: str) -> bool:
    """Does prefix + continuation state the right final answer?"""
    answer, _ = locate_answer("\n".join([*prefix, text]))
    return answer is not None and equivalent(problem_gold, parse_answer(answer))


def _first_step(row: dict) -> str | None:
    return row["steps"][0] if row["steps"] else None


def _chosen_ok(step: str | None, rejected: str, locate: str) -> bool:
    """A chosen step differs from the rejected one, and under --locate equations states no false equation."""
    return bool(step) and step != rejected and (locate != "equations" or step_verdict(step) != "wrong")


def solved_solutions(problem: Problem, samples: list[dict], right: list[bool]) -> list[dict]:
    """The samples of `problem` graded right (`right`, mine's own grades), as step lists `sft` reads: rejection-sampling
    fine-tuning data (RFT, Yuan et al. 2023, arXiv:2308.01825), the self-training baseline that uses the same
    information as the pairs (the policy's samples and the reference answers, no reference solutions). Every right
    sample is kept, repeats included: RFT's paper keeps distinct reasoning paths only, but on the loop demo that
    lowered the RFT control from 0.734 to 0.650, since repeats are the policy's confident solutions and dropping
    them raises the share of right answers reached through a wrong step (README "The loop")."""
    return [{"id": r["id"], "problem": problem.text, "answer": problem.answer, "steps": r["steps"]}
            for r, good in zip(samples, right) if good and r["steps"]]


def mine(options: MineOptions, model=None) -> dict:
    """Mine on-policy step pairs: sample, grade, locate the first wrong step (rollouts or a PRM), correct it with
    the policy's own continuations. Writes OUT/pairs.jsonl (the one pair schema), OUT/solved.jsonl (the samples
    that were right, for `sft`) and OUT/report.json."""
    problems, _ = read_problems(options.problems)
    if options.limit:
        problems = problems[: options.limit]
    if options.locate == "prm":  # a reward model that cannot load stops the run now, not after the sampling
        from stepdpo.auth import model_token

        model_token(options.reward_model, options.hf_token_file, "--reward-model")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    sampler = _Sampler(options, model=model)
    gold = {p.id: parse_answer(p.answer) for p in problems}
    try:
        t = time.perf_counter()
        first = sampler.draw([(p, ()) for p in problems], options.samples, solutions=True)
        stages["sample"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        wrong: list[tuple[Problem, dict]] = []
        solved, solved_rows, examined_right = {}, [], 0
        for p, rows in zip(problems, first):
            ok = [_reaches(gold[p.id], (), r["text"]) for r in rows]
            solved[p.id] = sum(ok) / len(ok)
            solved_rows += solved_solutions(p, rows, ok)
            examine = [(r, good) for r, good in zip(rows, ok) if r["steps"] and (
                not good or (options.locate == "equations" and _false_step(r) is not None))][: options.max_wrong]
            wrong += [(p, r) for r, _ in examine]
            examined_right += sum(good for _, good in examine)
        stages["grade"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        # rollouts from a prefix, shared by every wrong sample of a problem that has that prefix
        rollouts: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
        start = solved  # the empty prefix's success rate (max_drop's first comparison)
        if not sampler.solutions_apart:
            for p, rows in zip(problems, first):
                rollouts[(p.id, ())] = rows  # the K first samples are the continuations of the empty prefix
        elif options.locate == "rollout" and options.error_rule == "max_drop":
            # solutions drawn at another temperature (greedy ones succeed 0 or 1 times) are not the continuations'
            # rate: M continuations of the empty prefix give it, as for every other prefix
            need = list(dict.fromkeys((p, ()) for p, _ in wrong))
            for (p, prefix), rows in zip(need, sampler.draw(need, options.rollouts) if need else []):
                rollouts[(p.id, prefix)] = rows
            start = {p.id: sum(_reaches(gold[p.id], (), x["text"]) for x in rollouts[(p.id, ())]) / options.rollouts
                     for p, _ in wrong}
        if options.locate == "rollout":
            located = _locate_by_rollouts(wrong, rollouts, sampler, gold, options.rollouts, options.error_rule, start)
        elif options.locate == "equations":
            located = [(p, r, k) for p, r in wrong if (k := _false_step(r)) is not None]
        else:
            located = _locate_by_prm(wrong, options)
        stages["locate"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        need = [(p, tuple(r["steps"][: k - 1])) for p, r, k in located if (p.id, tuple(r["steps"][: k - 1])) not in rollouts]
        need = list(dict.fromkeys(need))
        for (p, prefix), rows in zip(need, sampler.draw(need, options.rollouts) if need else []):
            rollouts[(p.id, prefix)] = rows
        if options.chosen_min_success > 0:  # M continuations after each candidate chosen step
            candidates = []
            for p, r, k in located:
                prefix = tuple(r["steps"][: k - 1])
                for x in rollouts.get((p.id, prefix), []):
                    step = _first_step(x)
                    if _chosen_ok(step, r["steps"][k - 1], options.locate) and _reaches(gold[p.id], prefix, x["text"]):
                        candidates.append((p, prefix + (step,)))
            candidates = [c for c in dict.fromkeys(candidates) if (c[0].id, c[1]) not in rollouts]
            for (p, prefix), rows in zip(candidates, sampler.draw(candidates, options.rollouts) if candidates else []):
                rollouts[(p.id, prefix)] = rows
        pairs = _pairs(located, rollouts, gold, options, start)
        stages["correct"] = round(time.perf_counter() - t, 2)
    except VLLMError as e:  # every batch that arrived is in the cache: a re-run asks only for the rest
        raise MineError(f"{e} ({len(sampler.cache.rows)} generations so far are cached in "
                        f"{sampler.cache.path}; re-run the same command to resume)") from None
    finally:
        sampler.cache.close()
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "solved.jsonl", solved_rows)
    per_problem = defaultdict(int)
    for pair in pairs:
        per_problem[pair["problem"]] += 1
    report = {
        "problems": len(problems), "samples": len(problems) * options.samples,
        **({"sample_temperature": options.sample_temperature} if options.sample_temperature is not None else {}),
        "sample_accuracy": sum(solved.values()) / len(solved) if solved else 0.0,
        "solved_solutions": len(solved_rows), "wrong_examined": len(wrong),
        **({"right_answers_examined": examined_right} if options.locate == "equations" else {}),
        "errors_located": len(located),
        "pairs": len(pairs),
        "problems_with_pairs": len(per_problem),
        "yield_per_problem": len(pairs) / len(problems) if problems else 0.0,
        "generations": sampler.generated, "cache_hits": sampler.cache_hits, "locate": options.locate,
        **({"error_rule": options.error_rule,
            # the rates stop at the first zero, so its step is the last one rated
            "located_before_first_zero": sum(1 for _, r, k in located if k < max(r["_rates"]))}
           if options.locate == "rollout" else {}),
        "stages": stages,
        **({"vllm": sampler.generator.report()} if isinstance(sampler.generator, VLLMGenerator) else {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))
    return report


def _locate_by_rollouts(wrong, rollouts, sampler: _Sampler, gold, m: int, rule: str,
                        start: dict) -> list[tuple[Problem, dict, int]]:
    """Math-Shepherd's estimate, breadth-first over all wrong samples: at round k, M continuations from each
    sample's prefix ending at step k; the first k whose continuations never reach the answer is its error
    (first_zero), or the step up to it whose success rate falls most from the prefix before it (max_drop; the
    empty prefix's rate is the problem's share of right samples)."""
    active = [(p, r) for p, r in wrong]
    located = []
    k = 1
    while active:
        requests = list(dict.fromkeys((p, tuple(r["steps"][:k])) for p, r in active
                                      if (p.id, tuple(r["steps"][:k])) not in rollouts))
        for (p, prefix), rows in zip(requests, sampler.draw(requests, m) if requests else []):
            rollouts[(p.id, prefix)] = rows
        still = []
        for p, r in active:
            prefix = tuple(r["steps"][:k])
            rate = sum(_reaches(gold[p.id], prefix, x["text"]) for x in rollouts[(p.id, prefix)]) / m
            r.setdefault("_rates", {})[k] = rate
            if rate == 0:
                located.append((p, r, k if rule == "first_zero" else _max_drop(r["_rates"], start[p.id])))
            elif k < len(r["steps"]):
                still.append((p, r))
            # a wrong solution whose every prefix still reaches the answer: its error is not in a step; skip it
        active = still
        k += 1
    return located


def _max_drop(rates: dict[int, float], start: float) -> int:
    """The step k (1-based) with the most negative rates[k] - rates[k-1] (rates[0] = start); the earliest on a tie,
    since a later step after an earlier wrong one only inherits its failure."""
    best, best_k, before = None, 1, start
    for k in sorted(rates):
        drop = rates[k] - before
        if best is None or drop < best:
            best, best_k = drop, k
        before = rates[k]
    return best_k


def _false_step(row: dict) -> int | None:
    """--locate equations: the first step (1-based) of a sample that states a false equation, or None."""
    return next((k for k, step in enumerate(row["steps"], 1) if step_verdict(step) == "wrong"), None)


def _locate_by_prm(wrong, options: MineOptions) -> list[tuple[Problem, dict, int]]:
    """The first step whose process reward is below the threshold, through the `score` backends."""
    from stepdpo.auth import model_token
    from stepdpo.reward.score import ScoreOptions, make_backend
    from stepdpo.reward.scorer import MethodSpec

    score_opts = ScoreOptions(pairs=options.problems, model=options.reward_model, out=options.out, method="prm",
                              backend=options.reward_backend, url=options.reward_url, prm_step_tag=options.prm_step_tag,
                              prm_head=options.prm_head, batch_size=options.batch_size, progress=False)
    spec = MethodSpec(model=options.reward_model, method="prm", step_tag=options.prm_step_tag, head=options.prm_head)
    backend = make_backend(score_opts, spec, model_token(options.reward_model, options.hf_token_file, "--reward-model"))
    solutions = [(p.text, list(r["steps"])) for p, r in wrong]
    batches = [solutions[i : i + options.batch_size] for i in range(0, len(solutions), options.batch_size)]
    rewards: list = [None] * len(batches)
    backend.run("prm", batches, lambda i, res: rewards.__setitem__(i, res))
    flat = [x for batch in rewards for x in batch]
    located = []
    for (p, r), per_step in zip(wrong, flat):
        r["_rewards"] = per_step
        below = [i for i, v in enumerate(per_step) if v < options.prm_threshold]
        if below:
            located.append((p, r, below[0] + 1))
    return located


def _pairs(located, rollouts, gold, options: MineOptions, start: dict) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for p, r, k in located:
        prefix = tuple(r["steps"][: k - 1])
        rejected = r["steps"][k - 1]
        rows = rollouts.get((p.id, prefix), [])
        good = [x for x in rows if _reaches(gold[p.id], prefix, x["text"])]
        source = {"file": str(Path(options.problems).resolve()), "problem_id": p.id, "sample_id": r["id"],
                  "locate": options.locate, "error_step": k,
                  "correction_success_rate": len(good) / len(rows) if rows else 0.0}
        if "_rates" in r:
            source["rollout_success"] = {str(j): v for j, v in sorted(r["_rates"].items())}
            source["sample_success"] = start[p.id]  # the empty prefix's rate: max_drop's first comparison
            source["error_rule"] = options.error_rule
        if "_rewards" in r:
            source["step_rewards"] = r["_rewards"]
        for x in good:
            chosen = _first_step(x)
            if not _chosen_ok(chosen, rejected, options.locate):
                continue
            src = source
            if options.chosen_min_success > 0:
                after = rollouts.get((p.id, prefix + (chosen,)), [])
                rate = sum(_reaches(gold[p.id], prefix + (chosen,), y["text"]) for y in after) / max(len(after), 1)
                if rate < options.chosen_min_success:
                    continue
                src = {**source, "chosen_success_rate": rate}
            key = (p.text, prefix, chosen, rejected)
            if key in merged:
                if src not in merged[key]["source"]:
                    merged[key]["source"].append(src)
                continue
            merged[key] = make_pair("step", p.text, list(prefix), [chosen], [rejected], [src])
    return list(merged.values())
