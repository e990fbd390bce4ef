"""PRM800K (phase 1 and phase 2) records -> step pairs.

The rules (the default policy; README "Data" restates them):

* A line is rejected when it is not valid JSON, not an object, has no non-empty string
  `question.problem`, has no list `label.steps`, has a step that is not an object or whose
  `completions` is not a list, a completion whose `text` is not a non-empty string, a `rating`
  outside {-1, 0, 1, null}, or a `chosen_completion` that is neither null nor a valid index.
* `finish_reason == "bad_problem"`: skipped, no pairs. `give_up` and quality-control questions are used.
* Walk the steps with a prefix (initially empty). Candidates at a step: completions whose rating is
  not null and that are not flagged, plus `human_completion` (a string, or an object with `text`) as a
  +1 candidate. Every (+1, -1) combination is one `kind="step"` pair after the current prefix.
  Neutral (0) candidates are left out unless `neutral` says "positive" or "negative". A combination
  whose two texts are identical carries no preference and is not written.
* Then extend the prefix with `completions[chosen_completion].text`, or with the human completion
  when `chosen_completion` is null; when neither exists, stop walking the record.
* Optional `kind="solution"` pairs: per problem, a trajectory that ended in `solution` with no -1
  step vs one that contains a -1 step, after their common prefix, capped per problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEUTRAL_POLICIES = ("skip", "positive", "negative")
_NEUTRAL_AS = {"skip": None, "positive": 1, "negative": -1}


class RecordError(ValueError):
    """A malformed record; `reason` is a short code, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Walk:
    """What one valid record yields."""

    problem: str
    step_pairs: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)  # (prefix, chosen, rejected)
    trajectory: list[str] = field(default_factory=list)  # the walked path (+ the first -1 step if any)
    has_error: bool = False
    finish_reason: str | None = None
    identical_sides: int = 0  # (+1, -1) combinations with the same text: no preference, not written
    # ratings seen on the walked steps (after --neutral), to say why a record gave no pair
    positives: int = 0
    negatives: int = 0
    neutrals: int = 0
    stopped_on_error: bool = False  # the walk ended at a step whose candidates were all -1

    def no_pair_reason(self) -> tuple[str, str]:
        """(reason code, detail) for a valid record that yields no step pair."""
        seen = f"walked steps had {self.positives} +1, {self.negatives} -1 and {self.neutrals} skipped 0 candidates"
        if self.identical_sides and self.positives and self.negatives:
            return "identical_sides", f"every +1/-1 combination had the same text ({seen})"
        if self.finish_reason == "found_error" and self.stopped_on_error:
            return "found_error_no_positive_alternative", (
                "the labeller found an error and every alternative at that step is -1, with no +1 beside a -1 at any "
                f"earlier step ({seen})")
        if not self.negatives:
            return "no_negative_step", f"no step has a -1 candidate to pair against ({seen})"
        if not self.positives:
            return "no_positive_step", ("no step has a +1 candidate (e.g. a found error whose alternatives are all -1; "
                                        f"{seen})")
        return "no_step_with_both", f"no single step has both a +1 and a -1 candidate ({seen})"


def _valid_rating(r) -> bool:
    return r is None or (type(r) is int and r in (-1, 0, 1))


def _record_header(record) -> tuple[str, list]:
    if not isinstance(record, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(record).__name__}")
    question = record.get("question")
    problem = question.get("problem") if isinstance(question, dict) else None
    if not isinstance(problem, str) or not problem.strip():
        raise RecordError("missing_problem", "question.problem must be a non-empty string")
    label = record.get("label")
    steps = label.get("steps") if isinstance(label, dict) else None
    if not isinstance(steps, list):
        raise RecordError("missing_steps", "label.steps must be a list")
    return problem, steps


def _check_step(i: int, step) -> list:
    """The step's completions, or RecordError naming the first bad field."""
    if not isinstance(step, dict) or not isinstance(step.get("completions"), list):
        raise RecordError("bad_step", f"label.steps[{i}] must be an object with a list 'completions'")
    completions = step["completions"]
    for j, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not c["text"]:
            raise RecordError("bad_completion_text", f"label.steps[{i}].completions[{j}].text must be a non-empty string")
        if not _valid_rating(c.get("rating")):
            raise RecordError("bad_rating", f"label.steps[{i}].completions[{j}].rating is {c.get('rating')!r}, not -1/0/1/null")
    chosen = step.get("chosen_completion")
    if chosen is not None and not (type(chosen) is int and 0 <= chosen < len(completions)):
        raise RecordError(
            "bad_chosen_completion",
            f"label.steps[{i}].chosen_completion is {chosen!r}; expected null or an index below {len(completions)}",
        )
    return completions


def walk_record(record, neutral: str = "skip") -> Walk:
    """Apply the rules to one parsed record (raises RecordError when malformed).

    This is prepare's hot path: validation and the candidate collection share one loop over each
    step's completions (the checks are _check_step's, inlined). The whole record is still validated
    after the walk has stopped, so a bad later step rejects the record.
    """
    problem, steps = _record_header(record)
    walk = Walk(problem=problem, finish_reason=record["label"].get("finish_reason"))
    neutral_as = _NEUTRAL_AS[neutral]
    prefix: list[str] = []
    add_pair = walk.step_pairs.append
    walking = True
    for i, step in enumerate(steps):
        if not walking:
            _check_step(i, step)
            continue
        completions = step.get("completions") if step.__class__ is dict else None
        if completions.__class__ is not list:
            _check_step(i, step)  # raises with the precise reason
        good: list[str] = []
        bad: list[str] = []
        for c in completions:
            if c.__class__ is not dict:
                _check_step(i, step)
            text = c.get("text")
            rating = c.get("rating")
            if text.__class__ is not str or not text or (
                    rating is not None and (rating.__class__ is not int or rating < -1 or rating > 1)):
                _check_step(i, step)
            if rating is None or c.get("flagged") is True:
                continue
            if rating == 0:
                if neutral_as is None:
                    walk.neutrals += 1
                    continue
                rating = neutral_as
            # Identical texts within a step are one candidate (phase 2 repeats the erroneous step's text as
            # an alternative): otherwise one record would give the same pair, and the same source, twice.
            same = good if rating == 1 else bad
            if text not in same:
                same.append(text)
        chosen = step.get("chosen_completion")
        if chosen is not None and not (chosen.__class__ is int and 0 <= chosen < len(completions)):
            _check_step(i, step)
        human = step.get("human_completion")
        if human is not None:
            if human.__class__ is dict:
                human = human.get("text")
            if human.__class__ is not str or not human:
                human = None
            elif human not in good:
                good.append(human)
        walk.positives += len(good)
        walk.negatives += len(bad)
        if good and bad:
            frozen = tuple(prefix)
            for g in good:
                for b in bad:
                    if g != b:
                        add_pair((frozen, g, b))
                    else:
                        walk.identical_sides += 1
        if chosen is not None:
            picked = completions[chosen]
            prefix.append(picked["text"])
            if picked.get("rating") == -1:
                walk.has_error = True
        elif human is not None:
            prefix.append(human)
        else:
            if bad:  # the trajectory ends on its first error (phase 2 found_error)
                prefix.append(bad[0])
                walk.has_error = True
                walk.stopped_on_error = not good
            walking = False
    walk.trajectory = prefix
    return walk


def solution_pairs(walks: list[Walk], cap_per_problem: int) -> list[tuple[list[str], list[str], list[str]]]:
    """(common prefix, good tail, bad tail) for one problem's trajectories, at most `cap_per_problem`."""
    good = [w.trajectory for w in walks if w.finish_reason == "solution" and not w.has_error and w.trajectory]
    bad = [w.trajectory for w in walks if w.has_error and w.trajectory]
    out, seen = [], set()
    for g in good:
        for b in bad:
            n = 0
            while n < min(len(g), len(b)) and g[n] == b[n]:
                n += 1
            if n == len(g) or n == len(b):
                continue  # one side is a prefix of the other: no two step lists to compare
            key = (tuple(g), tuple(b))
            if key in seen:
                continue
            seen.add(key)
            out.append((g[:n], g[n:], b[n:]))
            if len(out) >= cap_per_problem:
                return out
    return out
