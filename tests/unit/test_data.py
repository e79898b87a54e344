from tests.conftest import require_data
from training import data as D


def test_folds_follow_normalized_prompt_text():
    assert D.prompt_fold("What is 2+2?\nA. 4", 10) == D.prompt_fold("  what is 2+2?  a. 4 ", 10)
    folds = D.folds([f"prompt {i}" for i in range(2000)], 10)
    counts = [int((folds == k).sum()) for k in range(10)]
    assert min(counts) > 150  # roughly balanced


def test_load_long_form_terms():
    data = D.load(["mmlu", "alpaca_eval"], require_data(), limit=20)
    assert data.n_rows == 40
    assert len(data.target) == 20 * 2 + 20 * 15
    assert data.models[:2] == ["mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"]
    rows, models, mat = data.outcome_matrix("alpaca_eval")
    assert mat.shape == (20, 15) and len(models) == 15
    assert {f["name"] for f in data.files} == {"mmlu", "alpaca_eval"}
    assert all(len(str(f["sha256"])) == 64 for f in data.files)
