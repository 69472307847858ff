"""Qwen-VL's tokenizer additions: real ids, byte-level image spans, from_list_format, boxes in and out."""

from __future__ import annotations

import json

import pytest

from qwen_edu.tokenizer import load_tokenizer
from qwen_edu.tokenizer.qwen_vl import (
    IMAGE_SPAN,
    QWEN_VL_TOKENS,
    BoxFormatError,
    GroundedBox,
    QwenVLTokenizer,
    add_qwen_vl_tokens,
    box_iou,
    denormalize_box,
    format_box,
    load_qwen_vl_tokenizer,
    normalize_box,
    parse_boxes,
    to_list_format,
)


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    return load_qwen_vl_tokenizer()


def test_the_nine_tokens_have_their_real_ids(tok):
    assert {t: tok.special_tokens[t] for t in QWEN_VL_TOKENS} == dict(zip(QWEN_VL_TOKENS, range(151851, 151860)))
    assert tok.special_tokens["<|extra_204|>"] == 151850 and tok.special_tokens["<|endoftext|>"] == 151643
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (151857, 151858, 151859)
    assert tok.encode("<ref>a dog</ref>")[0] == 151851 and tok.encode("<box>")[0] == 151853


def test_an_image_span_is_the_path_bytes_padded_to_256(tok):
    ids = tok.encode("Picture 1: <img>demo.jpeg</img>\nWhat is this?")
    start = ids.index(151857)
    assert ids[:start] == tok.tokenizer.encode("Picture 1: ")
    assert ids[start + 1:start + 10] == list(b"demo.jpeg")  # one id per byte, id = byte value
    assert ids[start + 10:start + 257] == [151859] * 247
    assert ids[start + 257] == 151858 and len(ids[start:start + 258]) == 258
    assert ids[start + 258:] == tok.tokenizer.encode("\nWhat is this?")


def test_paths_are_nfc_utf8_bytes(tok):
    decomposed = "cafe\u0301.png"  # e + combining acute: NFC makes one code point, 2 UTF-8 bytes
    ids = tok.encode(f"<img>{decomposed}</img>")
    assert ids[1:7] == list("café".encode()) + [ord(".")]


def test_decode_turns_spans_back_into_paths(tok):
    text = "Picture 1: <img>https://example.com/a b.png</img>\n<ref>the cat</ref><box>(1,2),(300,400)</box>"
    assert tok.decode(tok.encode(text)) == text
    assert "<img>" not in tok.decode(tok.encode(text), skip_special_tokens=True)


def test_a_path_longer_than_the_span_is_an_error(tok):
    tok.encode(f"<img>{'a' * 256}</img>")  # exactly 256 bytes fit
    with pytest.raises(ValueError, match="is 257 bytes long; the span between <img> and </img> holds at most 256"):
        tok.encode(f"<img>{'a' * 257}</img>")
    with pytest.raises(ValueError, match="is 258 bytes long"):
        tok.encode(f"<img>{'é' * 129}</img>")  # 129 characters, 258 bytes


def test_unbalanced_image_tags_are_errors(tok):
    with pytest.raises(ValueError, match="<img> at character 11 has no closing </img>"):
        tok.encode("Picture 1: <img>demo.jpeg")
    with pytest.raises(ValueError, match="</img> at character 4 closes no <img>"):
        tok.encode("oops</img>")


def test_from_list_format_builds_the_reference_prompt(tok):
    items = [{"image": "a.jpg"}, {"image": "b.jpg"}, {"text": "Where is the dog?"},
             {"ref": "the dog", "box": [(10, 20, 300, 400), (0, 0, 999, 999)]}]
    assert tok.from_list_format(items) == ("Picture 1: <img>a.jpg</img>\nPicture 2: <img>b.jpg</img>\n"
                                           "Where is the dog?<ref>the dog</ref><box>(10,20),(300,400)</box>"
                                           "<box>(0,0),(999,999)</box>")
    with pytest.raises(BoxFormatError, match=r"item 0: .*coordinate 1000 .* outside \[0, 1000\)"):
        tok.from_list_format([{"box": [(0, 0, 1000, 10)]}])
    with pytest.raises(ValueError, match="has none of 'image', 'text', 'box'"):
        tok.from_list_format([{"video": "x.mp4"}])


def test_to_list_format_splits_text_and_tags():
    text = "Picture 1: <img>a.jpg</img>\nThe <ref>cat</ref><box>(1,2),(3,4)</box> sleeps"
    assert to_list_format(text) == [{"text": "Picture 1: "}, {"image": "a.jpg"}, {"text": "\nThe "},
                                    {"ref": "cat"}, {"box": "(1,2),(3,4)"}, {"text": " sleeps"}]
    with pytest.raises(ValueError, match="<ref> .* has no closing </ref>"):
        to_list_format("<ref>cat")


def test_parse_boxes_reads_refs_and_boxes():
    text = "<ref>the red circle</ref><box>(12,34),(560,780)</box> and <ref>two dogs</ref><box>(0,0),(5,5)</box>" \
           "<box>( 6 , 7 ),( 8 , 9 )</box> then <box>(1,1),(2,2)</box>"
    assert parse_boxes(text) == [GroundedBox((12, 34, 560, 780), "the red circle"), GroundedBox((0, 0, 5, 5), "two dogs"),
                                 GroundedBox((6, 7, 8, 9), "two dogs"), GroundedBox((1, 1, 2, 2), None)]
    assert parse_boxes("no boxes here") == []


@pytest.mark.parametrize("text, words", [
    ("<box>(1,2),(3)</box>", r"malformed box '\(1,2\),\(3\)'"),
    ("<box>(1,2),(3,x)</box>", "malformed box"),
    ("<box>(-1,2),(3,4)</box>", "malformed box"),
    ("<box>(1,2),(3,1000)</box>", r"coordinate 1000 of box \(1, 2, 3, 1000\) is outside \[0, 1000\)"),
    ("<box>(500,2),(3,4)</box>", "top-left corner right of or below"),
    ("<ref>a</ref><box>(1,2),(3,4)", "<box> .* has no closing </box>"),
])
def test_malformed_boxes_are_clear_errors(text, words):
    with pytest.raises(BoxFormatError, match=words):
        parse_boxes(text)


def test_box_normalisation_and_iou():
    assert normalize_box((0, 0, 224, 112), 224, 224) == (0, 0, 999, 500)
    assert denormalize_box((0, 0, 999, 500), 448, 448) == (0, 0, 447, 224)
    assert format_box((1, 2, 3, 4)) == "<box>(1,2),(3,4)</box>"
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        normalize_box((0, 0, 1, 1), 0, 10)


def test_a_small_vocabulary_gets_the_tokens_appended(tmp_path, repo_root):
    base = load_tokenizer(repo_root / "qwen_edu" / "assets" / "base_model")
    small = add_qwen_vl_tokens(base)
    first = base.vocab_size
    assert [small.special_tokens[t] for t in QWEN_VL_TOKENS] == list(range(first, first + 9))
    vl = QwenVLTokenizer(small, image_span=16)
    ids = vl.encode("<img>x.png</img>a red circle")
    assert ids[:7] == [vl.img_start_id, *b"x.png", vl.img_pad_id] and ids[17] == vl.img_end_id
    assert vl.decode(ids) == "<img>x.png</img>a red circle"
    with pytest.raises(ValueError, match="already has"):
        add_qwen_vl_tokens(small)
    with pytest.raises(ValueError, match="lacks the Qwen-VL tokens"):
        QwenVLTokenizer(base)
    # A folder's span comes from its config.json (the model's n_queries).
    from qwen_edu.tokenizer import save_pretrained

    save_pretrained(small, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"visual": {"n_queries": 16}}))
    assert load_qwen_vl_tokenizer(tmp_path).image_span == 16
    assert load_qwen_vl_tokenizer().image_span == IMAGE_SPAN


def test_chat_template_expands_images_and_masks_the_reply(tok):
    messages = [{"role": "user", "content": "Picture 1: <img>a.png</img>\nWhat colour?"},
                {"role": "assistant", "content": "red"}]
    encoding = tok.apply_chat_template(messages)
    assert encoding.ids.count(151859) == 256 - 5 and encoding.ids.count(151857) == 1
    learned = [i for i, m in zip(encoding.ids, encoding.loss_mask) if m]
    assert tok.decode(learned) == "red<|im_end|>"
