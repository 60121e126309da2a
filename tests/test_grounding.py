"""parse_grounding: Qwen-VL's <ref>/<box>/<quad> markup -> GroundingBox."""

from qwen_vl.api.grounding import GroundingBox, parse_grounding


def test_ref_with_one_box():
    text = "<ref>the cat</ref><box>(120,340),(560,900)</box>"
    assert parse_grounding(text) == [
        GroundingBox("the cat", "box", [(120, 340), (560, 900)], (120, 340, 560, 900), (0, len(text)))
    ]


def test_every_box_after_a_ref_belongs_to_it():
    text = "<ref>dogs</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
    first, second = parse_grounding(text)
    assert (first.ref, first.box) == ("dogs", (1, 2, 3, 4))
    assert (second.ref, second.box) == ("dogs", (5, 6, 7, 8))


def test_spans_do_not_overlap_and_the_first_box_covers_its_ref():
    text = "See <ref>dogs</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>."
    first, second = parse_grounding(text)
    assert text[slice(*first.span)] == "<ref>dogs</ref><box>(1,2),(3,4)</box>"
    assert text[slice(*second.span)] == "<box>(5,6),(7,8)</box>"


def test_box_without_ref():
    (box,) = parse_grounding("It is here: <box>(10,20),(30,40)</box>")
    assert box.ref is None and box.box == (10, 20, 30, 40)


def test_text_between_ref_and_box_detaches_the_box():
    (box,) = parse_grounding("<ref>cat</ref> sits on the mat <box>(10,20),(30,40)</box>")
    assert box.ref is None


def test_quad_has_four_points_and_their_bounding_box():
    (quad,) = parse_grounding("<ref>STOP</ref><quad>(100,200),(300,180),(320,260),(110,280)</quad>")
    assert quad.kind == "quad"
    assert quad.points == [(100, 200), (300, 180), (320, 260), (110, 280)]
    assert quad.box == (100, 180, 320, 280)


def test_text_around_the_markup_is_ignored():
    text = "The answer: <ref>a red car</ref><box>(5,6),(7,8)</box> is parked.\nDone."
    (box,) = parse_grounding(text)
    assert box.ref == "a red car" and box.span == (12, 12 + len("<ref>a red car</ref><box>(5,6),(7,8)</box>"))


def test_chinese_ref():
    (box,) = parse_grounding("图中<ref>戴帽子的女孩</ref><box>(211,412),(577,891)</box>")
    assert box.ref == "戴帽子的女孩"
    assert box.span[0] == 2


def test_spaces_inside_the_coordinates_are_accepted():
    (box,) = parse_grounding("<box>( 1, 2 ), (3 ,4)</box>")
    assert box.points == [(1, 2), (3, 4)]


def test_reversed_corners_give_a_normalised_box():
    (box,) = parse_grounding("<box>(300,400),(100,200)</box>")
    assert box.points == [(300, 400), (100, 200)] and box.box == (100, 200, 300, 400)


def test_truncated_output_yields_no_box():
    assert parse_grounding("<ref>cat</ref><box>(1,2),(3") == []


def test_malformed_boxes_are_skipped_and_good_ones_kept():
    text = (
        "<box>(1,2)</box>"  # one point
        "<box>(1,2),(3,4),(5,6)</box>"  # three points
        "<quad>(1,2),(3,4)</quad>"  # a quad needs four
        "<box>(a,b),(c,d)</box>"
        "<box>(1,2),(3,4)</quad>"  # mismatched closing tag
        "<box>(-1,2),(3,4)</box>"
        "<box><box>(10,20),(30,40)</box>"  # a stray opening tag
    )
    (box,) = parse_grounding(text)
    assert box.box == (10, 20, 30, 40)


def test_coordinates_off_the_grid_are_skipped():
    assert parse_grounding("<box>(0,0),(1001,500)</box><box>(0,0),(99999,5)</box>") == []


def test_coordinates_at_the_edges():
    (box,) = parse_grounding("<box>(0,0),(1000,1000)</box>")
    assert box.box == (0, 0, 1000, 1000)
    assert box.to_pixels(640, 480) == (0, 0, 640, 480)


def test_pixels_round_down_like_the_original_drawing_code():
    (box,) = parse_grounding("<box>(123,456),(999,1)</box>")
    # int(x / 1000 * w): 78.72 -> 78, 218.88 -> 218, 639.36 -> 639, 0.48 -> 0
    assert box.to_pixels(640, 480) == (78, 0, 639, 218)


def test_text_without_markup_has_no_boxes():
    assert parse_grounding("A cat on a mat.") == []
