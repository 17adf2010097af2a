"""Text conventions, the answer position for any tokenizer, and the pure loss functions."""
import pytest
import torch

from pipeline.latent import ANSWER_PREFIX, answer_text, cot_text, question_prompt
from pipeline.losses import IGNORE_INDEX, causal_lm_ce, layerwise_distill, share, token_ce
from pipeline.methods.batching import answer_segment, first_answer_token, pad_batch


def test_text_conventions():
    assert question_prompt("  How many? ") == "How many?\n"
    assert answer_text("18") == "The answer is: 18" == ANSWER_PREFIX + "18"
    assert cot_text(["<<3*6=18>>", "<<18+1=19>>"], "19") == "<<3*6=18>>\n<<18+1=19>>\nThe answer is: 19"
    assert cot_text([], "7") == "The answer is: 7"


def gpt2_like_tokenizer(tmp_path):
    """A GPT-2-style byte-level BPE (no digit splitting) that learns the merge 'Ġ18'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The answer is: 18"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_answer_position_gpt2_style_is_the_colon(tmp_path):
    tok = gpt2_like_tokenizer(tmp_path)
    ids, first = answer_segment(tok, "18")
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[first] == "Ġ18"                     # the space merged into the answer token
    assert tokens[first - 1] == ":"                   # so ':' predicts it (CODI's GPT-2 position)


def test_answer_position_split_digits_is_the_lone_space(tokenizer):
    # The project's tiny tokenizer splits digits like LLaMA-3/SmolLM2: 'Ġ' then '1', '8'.
    ids, first = answer_segment(tokenizer, "18")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[first] == "1" and tokens[first - 1] == "Ġ"
    assert tokenizer.decode(ids[first:]) == "18"


def test_first_answer_token_slow_path_matches(tokenizer):
    class Slow:            # the decode-based fallback for tokenizers without offsets
        is_fast = False

        def __call__(self, text, **kw):
            return tokenizer(text, add_special_tokens=False)

        def decode(self, ids):
            return tokenizer.decode(ids)

    text = answer_text("624")
    assert first_answer_token(Slow(), text, len(ANSWER_PREFIX)) == first_answer_token(tokenizer, text,
                                                                                        len(ANSWER_PREFIX))


def test_pad_batch_left_prompts_right_suffixes():
    b = pad_batch([[5, 6, 7], [8]], [[1], [2, 3]], [[1], [IGNORE_INDEX, 3]], pad_id=0)
    assert b["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["suffix_ids"].tolist() == [[1, 0], [2, 3]]
    assert b["suffix_labels"].tolist() == [[1, IGNORE_INDEX], [IGNORE_INDEX, 3]]


def test_causal_lm_ce_per_row_and_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [IGNORE_INDEX, 3, 4, 5]])
    per_row = causal_lm_ce(logits, labels, reduction="none")
    ref0 = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    ref1 = torch.nn.functional.cross_entropy(logits[1, :3], labels[1, 1:4])
    torch.testing.assert_close(per_row, torch.stack([ref0, ref1]))
    # Batch value: mean over all 5 target tokens (not the mean of row means).
    torch.testing.assert_close(causal_lm_ce(logits, labels), (2 * ref0 + 3 * ref1) / 5)
    # No target at all: exactly 0, still differentiable (every rank keeps the same graph).
    empty = logits.clone().requires_grad_(True)
    loss = causal_lm_ce(empty, torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and empty.grad is not None


def test_layerwise_distill_detaches_teacher_and_normalises():
    torch.manual_seed(0)
    student = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    loss = layerwise_distill(student, teacher, kind="l2")
    loss.backward()
    assert all(t.grad is None for t in teacher)           # a target, never trained through this loss
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    expected = sum(((s - t).pow(2).mean() / t.std()) for s, t in zip(student, teacher)) / 2
    torch.testing.assert_close(loss, expected.detach())
    raw = layerwise_distill(student, teacher, kind="smooth_l1", normalize_by_teacher_std=False, reduction="none")
    assert raw.shape == (3,)
    with pytest.raises(ValueError):
        layerwise_distill(student, teacher[:1])


def test_layerwise_distill_row_std_is_each_rows_own():
    """teacher_std="row": each row divided by its own teacher vector's std, so a row's value does
    not depend on the batch (the paper's "batch" std does)."""
    torch.manual_seed(0)
    student = [torch.randn(3, 8) for _ in range(2)]
    teacher = [torch.randn(3, 8) * (1 + i) for i in range(2)]
    rows = layerwise_distill(student, teacher, kind="l2", std_over="row", reduction="none")
    expected = sum((s - t).pow(2).mean(-1) / t.std(-1) for s, t in zip(student, teacher)) / 2
    torch.testing.assert_close(rows, expected)
    alone = layerwise_distill([s[1:2] for s in student], [t[1:2] for t in teacher], kind="l2", std_over="row",
                              reduction="none")
    torch.testing.assert_close(alone[0], rows[1])
    paper = layerwise_distill([s[1:2] for s in student], [t[1:2] for t in teacher], kind="l2", reduction="none")
    assert not torch.allclose(paper[0], layerwise_distill(student, teacher, kind="l2", reduction="none")[1])
    with pytest.raises(ValueError, match="teacher_std"):
        layerwise_distill(student, teacher, std_over="layer")


def test_share_of_a_global_count_adds_up_to_the_global_mean():
    """Two micro batches' shares, each a sum over its tokens / the tokens of both, add up to the token
    mean of the whole batch; the mean of the micro batches' own means does not (rows differ in length)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[:2, 2:] = IGNORE_INDEX                       # two short rows, two long ones
    loss, mask = token_ce(logits, labels)
    whole = loss.sum() / mask.sum()
    total = mask.sum().item()
    torch.testing.assert_close(share(loss[:2], total) + share(loss[2:], total), whole)
    halves = (loss[:2].sum() / mask[:2].sum() + loss[2:].sum() / mask[2:].sum()) / 2
    assert abs(halves - whole) > 1e-3
    # No target anywhere: exactly 0, still differentiable (every rank keeps the same graph).
    empty = torch.randn(3, requires_grad=True)
    zero = share(empty * 0, 0)
    zero.backward()
    assert zero.item() == 0 and empty.grad is not None
