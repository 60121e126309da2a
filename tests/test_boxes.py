"""Boxes in an answer are mapped to the pixels of the image they refer to:
the conversation's last image, as the original draws them, unless the request
names another."""

from PIL import Image

from qwen_vl.api.generation import boxes

ANSWER = "The dog <ref>dog</ref><box>(100,200),(500,1000)</box> and <quad>(0,0),(10,0),(10,10),(0,10)</quad>"


def test_boxes_refer_to_the_last_image_by_default():
    images = [Image.new("RGB", (100, 100)), Image.new("RGB", (640, 480))]
    found = boxes(ANSWER, images, None)
    assert [(b.ref, b.kind, b.box, b.image_index) for b in found] == [
        ("dog", "box", (100, 200, 500, 1000), 1),
        (None, "quad", (0, 0, 10, 10), 1),
    ]
    assert found[0].box_pixels == (64, 96, 320, 480)


def test_boxes_refer_to_the_image_the_request_names():
    images = [Image.new("RGB", (1000, 500)), Image.new("RGB", (640, 480))]
    found = boxes(ANSWER, images, 0)
    assert found[0].image_index == 0 and found[0].box_pixels == (100, 100, 500, 500)


def test_boxes_without_an_image_have_no_pixels():
    found = boxes(ANSWER, [], None)
    assert found[0].image_index is None and found[0].box_pixels is None


def test_an_answer_without_tags_has_no_boxes():
    assert boxes("just text (1,2),(3,4)", [Image.new("RGB", (10, 10))], None) == []
