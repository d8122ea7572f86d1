"""What is special about DocVQA: ANLS scores against every accepted answer, the fixture has the
hub's exact features, and the hidden test answers are refused in one line instead of trained on."""

from __future__ import annotations

import datasets
import pytest

from conftest import compose
from vlm_sweep.data.datasets import BadRecordError, ConversationDataset, load_split
from vlm_sweep.data.sets.docvqa import write_fixture
from vlm_sweep.metrics.vqa import anls
from vlm_sweep.inference.score import reference

pytestmark = pytest.mark.usefixtures("private_hf_datasets_cache")

HUB_FEATURES = datasets.Features({
    "questionId": datasets.Value("string"), "question": datasets.Value("string"),
    "question_types": datasets.List(datasets.Value("string")), "image": datasets.Image(),
    "docId": datasets.Value("int64"), "ucsf_document_id": datasets.Value("string"),
    "ucsf_document_page_no": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
    "data_split": datasets.Value("string")})


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("docvqa"))


def test_anls_takes_the_best_accepted_answer_and_cuts_off_at_half():
    assert anls(["$ 1,000"], [["1000", "$1,000", "$ 1,000"]])["anls"] == 1.0
    assert anls(["  Hello   World "], ["hello world"])["anls"] == 1.0  # case and spacing ignored
    assert anls(["abcx"], ["abcd"])["anls"] == pytest.approx(0.75)  # 1 edit in 4 characters
    assert anls(["abxy"], ["abcd"])["anls"] == 0.0  # distance 0.5 reaches the threshold: no credit
    assert anls(["abcx", "nothing"], [["zzzz", "abcd"], ["abcd"]])["anls"] == pytest.approx(0.375)


def test_fixture_has_the_hub_config_splits_and_features(fixture_dir):
    for split in ("validation", "test"):
        loaded = datasets.load_dataset(str(fixture_dir), name="DocVQA", split=split)
        assert loaded.features == HUB_FEATURES and len(loaded) > 0
    assert all(row["answers"] is None for row in datasets.load_dataset(str(fixture_dir), name="DocVQA", split="test"))


def test_training_uses_validation_with_a_held_out_part_scored_on_every_answer(fixture_dir):
    cfg = compose(["dataset=docvqa", f"dataset.path={fixture_dir}"])
    train, heldout = load_split(cfg.dataset, "validation"), load_split(cfg.dataset, "heldout")
    assert len(heldout) >= 1 and len(train) + len(heldout) == 16
    samples = [ConversationDataset(split, cfg.dataset, name)[0] for split, name in
               ((train, "validation"), (heldout, "heldout"))]
    for sample in samples:
        answers = reference(sample.conversation)
        assert isinstance(answers, list) and sample.conversation[-1]["content"][0]["text"] == answers[0]


def test_scoring_the_hidden_test_split_is_one_line_saying_why(fixture_dir):
    cfg = compose(["dataset=docvqa", f"dataset.path={fixture_dir}"])
    with pytest.raises(BadRecordError, match=r"docvqa/test\[0\]: answers are missing .*hidden") as err:
        ConversationDataset(load_split(cfg.dataset, "test"), cfg.dataset, "test")[0]
    assert "\n" not in str(err.value)
