"""More MICCAT confounders the paper did not test, each a shortcut a radiologist would recognise.

Sizes are given for a 1024 px image (``reference_size``) and scaled to the actual image.
Randomness (marker position, tube path, border widths) comes only from the per-image ``rng``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .paper import blend, load_font, side, text_mask, to_uint8
from .registry import register_confounder

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def marker_coverage(image, rng, *, strength, text, font_size, colour, margin, jitter, corners,
                    boxed, reference_size, font):
    """The marker's coverage (0..1): letter and frame, placed with the image's ``rng`` draws."""
    h, w = image.shape
    size_px = max(1.0, font_size * side(image) / reference_size)
    face = load_font(font, round(size_px))
    glyph_w = face.getbbox(text, anchor="lt")[2]
    glyph_h = face.getbbox(text, anchor="lt")[3]
    pad = max(1, round(size_px * 0.2))
    box_w, box_h = glyph_w + 2 * pad, glyph_h + 2 * pad
    corner = corners[int(rng.integers(len(corners)))]
    shift_y, shift_x = rng.uniform(0, jitter, size=2)
    y0 = (margin + shift_y) * h if corner.startswith("top") else h - (margin + shift_y) * h - box_h
    x0 = (margin + shift_x) * w if corner.endswith("left") else w - (margin + shift_x) * w - box_w
    y0, x0 = int(np.clip(y0, 0, h - box_h)), int(np.clip(x0, 0, w - box_w))
    mask, _ = text_mask(image.shape, text, (x0 + pad, y0 + pad), font, size_px)
    if boxed:
        frame = Image.new("L", (w, h), 0)
        ImageDraw.Draw(frame).rectangle([x0, y0, x0 + box_w, y0 + box_h], outline=255,
                                        width=max(1, pad // 2))
        mask = np.maximum(mask, np.asarray(frame, np.float32) / 255.0)
    return mask


@register_confounder(
    "marker", category="environment/marker",
    description=("Radiographers place lead laterality markers by hand, so their position "
                 "varies from image to image while their style (letter, box, size) is "
                 "typical of a site; a model can learn the site instead of the disease."),
    defaults={"text": "L", "font_size": 56.0, "colour": 255, "margin": 0.05, "jitter": 0.06,
              "corners": CORNERS, "boxed": True, "reference_size": 1024,
              "font": "DejaVuSans-Bold.ttf"},
    mask=marker_coverage,
)
def marker(image, rng, *, strength, text, font_size, colour, margin, jitter, corners, boxed,
           reference_size, font):
    """A bold letter in a square frame near a corner drawn per image (plus a random shift)."""
    mask = marker_coverage(image, rng, strength=strength, text=text, font_size=font_size,
                           colour=colour, margin=margin, jitter=jitter, corners=corners,
                           boxed=boxed, reference_size=reference_size, font=font)
    return blend(image, mask, colour, strength)


@register_confounder(
    "gamma", category="environment/processing",
    description=("Each vendor maps detector signal to grey levels with its own tone curve, so "
                 "images from one device are systematically brighter or more contrasted."),
    defaults={"gamma": 0.7},
)
def gamma(image, rng, *, strength, gamma):
    """Grey-level curve 255 (x / 255) ** gamma; strength interpolates the exponent (gamma ** s)."""
    exponent = float(gamma) ** strength
    lut = to_uint8(255.0 * (np.arange(256) / 255.0) ** exponent)
    return lut[image]


@register_confounder(
    "jpeg", category="environment/processing",
    description=("Images referred from another hospital or a teleradiology archive are often "
                 "lossy JPEG re-compressed, leaving 8 x 8 block artefacts and losing fine detail."),
    defaults={"quality": 20},
)
def jpeg(image, rng, *, strength, quality):
    """JPEG re-compression at ``quality`` (strength 1) up to 100 (strength 0), decoded again."""
    q = round(100 - strength * (100 - quality))
    if strength == 0:
        return image.copy()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=max(1, min(q, 100)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L")).copy()


@register_confounder(
    "collimation", category="environment/acquisition",
    description=("Tight collimation or an electronic shutter applied at one site leaves flat "
                 "borders around the exposed field."),
    defaults={"border": 0.08, "jitter": 0.03, "fill": 0},
)
def collimation(image, rng, *, strength, border, jitter, fill):
    """Flat borders on the four sides, each ``border`` +- ``jitter`` of the side (per image)."""
    h, w = image.shape
    top, bottom, left, right = border + rng.uniform(-jitter, jitter, size=4)
    mask = np.zeros(image.shape, np.float32)
    mask[: round(max(top, 0) * h), :] = 1
    mask[h - round(max(bottom, 0) * h):, :] = 1
    mask[:, : round(max(left, 0) * w)] = 1
    mask[:, w - round(max(right, 0) * w):] = 1
    return blend(image, mask, fill, strength)


def support_device_coverage(image, rng, *, strength, width, colour, reference_size):
    """The tube's anti-aliased coverage (0..1), its path drawn from the image's ``rng``."""
    h, w = image.shape
    oversample = 2  # draw at twice the size, then average down: anti-aliased edges
    start = (rng.uniform(0.3, 0.7) * w, 0.0)
    bend = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.3, 0.6) * h)
    end = (rng.uniform(0.2, 0.8) * w, rng.uniform(0.65, 0.85) * h)
    t = np.linspace(0, 1, 64)[:, None]
    points = ((1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * np.array(bend)
              + t ** 2 * np.array(end)) * oversample
    canvas = Image.new("L", (w * oversample, h * oversample), 0)
    line_px = max(1, round(width * side(image) / reference_size * oversample))
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=line_px, joint="curve")
    return np.asarray(canvas.resize((w, h), Image.BOX), np.float32) / 255.0


@register_confounder(
    "support_device", category="patient/treatment",
    description=("Chest drains and tubes are inserted to treat a finding (e.g. pneumothorax), "
                 "so their line shadow marks treated patients rather than the disease itself."),
    defaults={"width": 10.0, "colour": 235, "reference_size": 1024},
    mask=support_device_coverage,
)
def support_device(image, rng, *, strength, width, colour, reference_size):
    """A bright curved tube (quadratic Bezier) from the upper border to the lower thorax."""
    mask = support_device_coverage(image, rng, strength=strength, width=width, colour=colour,
                                   reference_size=reference_size)
    return blend(image, mask, colour, strength)


@register_confounder(
    "resample", category="environment/processing",
    description=("An archive that stores images at reduced resolution and enlarges them again "
                 "for display blurs every edge in the same way."),
    defaults={"factor": 0.5},
)
def resample(image, rng, *, strength, factor):
    """Down-sample by ``factor`` (bilinear, anti-aliased) and back up; strength blends."""
    h, w = image.shape
    small = Image.fromarray(image).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                          Image.BILINEAR, reducing_gap=None)
    back = np.asarray(small.resize((w, h), Image.BILINEAR), np.float32)
    return to_uint8(image + strength * (back - image))
