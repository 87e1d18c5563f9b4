"""The rubric judge (common/judge.py): parsing, on replies written the way strong judges answer, and bad rubric files.
The client against a real server (our own `chat.py --serve` with the demo model, stopped mid-run) is in
tests/test_judging.py, which starts that server once for eval.py's judge and the client alike."""
import json

import pytest

from common.cli import UserError
from common.judge import load_rubric

RUBRIC = "data/counselling_rubric.json"


def test_rubric_parses_what_strong_judges_write():
    rubric = load_rubric(RUBRIC)
    dims = [d.name for d in rubric.dimensions]
    full = {d: 4 for d in dims}
    fenced = f"Here is my rating:\n```json\n{json.dumps({**full, 'reason': 'warm, asks an open question'})}\n```"
    assert rubric.parse(fenced) == {"scores": full, "reason": "warm, asks an open question"}
    assert rubric.normalised({d: 5 for d in dims}) == 1.0 and rubric.normalised({d: 1 for d in dims}) == 0.0
    # the last complete verdict wins; a score off the scale, a missing dimension or prose alone is no verdict
    assert rubric.parse(json.dumps({**full, "empathy": 2}) + " final: " + json.dumps(full))["scores"] == full
    assert rubric.parse(json.dumps({**full, "empathy": 7})) is None
    assert rubric.parse(json.dumps({d: 3 for d in dims[1:]})) is None
    assert rubric.parse("The reply is empathetic, I would give it 4/5.") is None


def test_bad_rubric_files_are_one_line(tmp_path):
    cases = {"scale": {"scale": [5, 1], "dimensions": []},
             "dimensions": {"dimensions": []},
             "anchors": {"dimensions": [{"name": "empathy", "description": "x", "anchors": {"9": "too high"}}]}}
    for word, data in cases.items():
        path = tmp_path / f"{word}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match=word) as e:
            load_rubric(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value)
