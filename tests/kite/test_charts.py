"""kite/charts.py: server-rendered SVG time charts (pure, no database)."""

import xml.etree.ElementTree as ET

import pytest

from kite import charts

SVG = "{http://www.w3.org/2000/svg}"


def _chart(**overrides) -> ET.Element:
    arguments = {
        "chart_id": "c", "title": "Traffic", "desc": "12 events in.", "labels": ["09:00", "09:01", "09:02", "09:03"],
        "series": [charts.Series("Events in", [1, 5, None, 10]), charts.Series("Failed", [0, 2, 0, 1], kind="bars")],
    }  # fmt: skip
    return ET.fromstring(charts.time_chart(**{**arguments, **overrides}))


def test_a_chart_is_an_image_named_by_its_title_and_described_by_its_figures():
    svg = _chart()
    assert svg.tag == SVG + "svg" and svg.get("role") == "img"
    assert svg.get("aria-labelledby") == "c-title c-desc"
    assert svg.find(SVG + "title").get("id") == "c-title" and svg.find(SVG + "title").text == "Traffic"
    assert svg.find(SVG + "desc").get("id") == "c-desc" and svg.find(SVG + "desc").text == "12 events in."
    # What is drawn is hidden from assistive technology: the title, the description and the page's table speak.
    assert all(group.get("aria-hidden") == "true" for group in svg.findall(SVG + "g"))


def test_every_text_is_escaped():
    hostile = '<script>alert(1)</script>" onload="x'
    text = charts.time_chart(chart_id='c"><script>', title=hostile, desc=hostile, labels=[hostile],
                             series=[charts.Series(hostile, [1])])  # fmt: skip
    assert "<script>" not in text and 'onload="x' not in text
    svg = ET.fromstring(text)  # still well-formed
    assert svg.find(SVG + "title").text == hostile


def test_the_scale_is_a_round_maximum_and_values_land_where_they_belong():
    assert [charts.nice_max(v) for v in (0, 0.3, 1, 7, 10, 11, 99, 101, 2500)] == [1, 0.5, 1, 10, 10, 20, 100, 200, 5000]
    svg = _chart(series=[charts.Series("x", [0, 10, 20, 5])])
    path = svg.find(f"{SVG}g[@class='series series-0']/{SVG}path").get("d")
    points = [tuple(map(float, point.lstrip("ML").split(","))) for point in path.split()]
    bottom, top = charts.HEIGHT - charts.BOTTOM, charts.TOP
    assert [y for _, y in points] == pytest.approx([bottom, (bottom + top) / 2, top, bottom - (bottom - top) / 4])
    xs = [x for x, _ in points]
    assert xs == sorted(xs) and len(set(round(b - a, 3) for a, b in zip(xs, xs[1:], strict=False))) == 1
    labels = [text.text for text in svg.iter(SVG + "text") if text.get("class") == "axis"]
    assert labels[:3] == ["0", "10", "20"]  # the y axis: 0, half, top


def test_a_gap_lifts_the_pen_and_a_lone_point_is_a_dot():
    svg = _chart(series=[charts.Series("x", [1, 2, None, 3, None, 4, 5])], labels=[str(n) for n in range(7)])
    group = svg.find(f"{SVG}g[@class='series series-0']")
    assert group.find(SVG + "path").get("d").count("M") == 2  # 1–2 and 4–5
    assert len(group.findall(SVG + "circle")) == 1  # 3 alone


def test_bars_are_drawn_for_non_zero_values_only():
    svg = _chart()
    bars = svg.find(f"{SVG}g[@class='series series-1 bars']")
    assert len(bars.findall(SVG + "rect")) == 2
    failures = _chart(series=[charts.Series("Failed", [0, 2, 0, 1], kind="bars", tone="bad")])
    assert failures.find(f"{SVG}g[@class='series series-0 tone-bad bars']") is not None  # red wherever it stands


def test_nothing_to_show_is_an_empty_chart_not_an_error():
    svg = _chart(series=[charts.Series("x", [None, None, None, None])])
    assert svg.find(f"{SVG}g[@class='series series-0']/{SVG}path") is None


def test_a_series_must_have_one_value_per_label():
    with pytest.raises(ValueError):
        charts.time_chart(chart_id="c", title="t", desc="d", labels=["a", "b"], series=[charts.Series("x", [1])])


def test_x_labels_are_a_few_and_include_the_last():
    labels = [f"{n:02d}" for n in range(60)]
    svg = _chart(labels=labels, series=[charts.Series("x", list(range(60)))])
    shown = [text.text for text in svg.find(f"{SVG}g[@class='x-labels']")]
    assert shown[0] == "00" and shown[-1] == "59" and 4 <= len(shown) <= charts.X_LABELS + 1


def test_numbers_read_as_operators_expect():
    assert charts.number(None) == "—"
    assert charts.number(1234567) == "1,234,567"
    assert charts.number(12.34, "ms") == "12.3 ms"
    assert charts.number(250.6, "ms") == "251 ms"


def test_the_figures_table_names_each_row_and_escapes_every_text():
    table = ET.fromstring(charts.figures_table(caption="Per <minute>", headers=["Minute", "Events <in>"],
                                               rows=[("09:00", 1234), ("<b>", None)]))  # fmt: skip
    assert table.find("caption").text == "Per <minute>"
    assert [th.get("scope") for th in table.find("thead/tr")] == ["col", "col"]
    rows = table.findall("tbody/tr")
    assert [(row[0].get("scope"), row[0].text, row[1].text) for row in rows] == [("row", "09:00", "1,234"),
                                                                                ("row", "<b>", "—")]  # fmt: skip
