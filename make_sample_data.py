"""Generate a small synthetic mask dataset in the competition's exact layout (train + eval).

What lives here: the person metadata sampler (`sample_persons`, following the real data's
gender x age distribution), the id quirks of the real `train.csv` (`assign_ids`), the cartoon
photo painter (`draw_person_photo`) and `generate()`, which writes it all atomically.

The photos carry visible, learnable cues for the three sub-labels:
- mask: wear = mask over nose and mouth; incorrect = mask below the nose (over mouth and chin,
  or on the chin); normal = no mask, mouth visible. Mask colours vary; the position is the cue.
- gender: female = long hair falling to the shoulders on both sides, thin eyebrows;
  male = short hair, thick eyebrows.
- age band: hair brightness (<30 black/dark brown, 30..59 mid-grey, 60 white; the ranges never
  overlap, even after the brightness jitter) and forehead wrinkles (none / 2 / 3 lines).
Edit the constants below to change the distribution or the look.

`--difficulty real` draws the same layout and shares as hard as the real task is: age is a
continuous cue (hair greys and wrinkles deepen year by year, with a per-person spread of
REAL_AGE_SD years, so a 58-year-old looks like a 60-year-old), gender cues overlap (some women
wear short hair, some men long; eyebrow widths overlap), an incorrect mask may only bare the tip
of the nose, each person has their own face shape, lighting, clothes and background (a model can
memorize people), the pose varies more between photos, and about 1% of the training labels are
wrong (whole persons with the wrong gender or age band, persons whose incorrect_mask and normal
photos are swapped), as in the real train set. The wrong labels are listed in
train/label_noise.csv (path under images/, the written label, the true one); eval answers are true.

Example: `python make_sample_data.py --out data --persons 300 --eval-persons 150 --seed 0`
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import csv
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maskcls import cli
WIDTH, HEIGHT = 384, 512            # the competition's photo size (PIL order: width, height)
PHOTOS = [("mask1", 0), ("mask2", 0), ("mask3", 0), ("mask4", 0), ("mask5", 0),
          ("incorrect_mask", 1), ("normal", 2)]  # file stem -> mask label (wear 0, incorrect 1, not wear 2)
GENDERS = ("male", "female")        # label order: male 0, female 1
# People per gender x age band (<30, 30..59, 60) in the real train.csv (2,700 people).
REAL_COUNTS = {"female": (732, 817, 109), "male": (549, 410, 83)}
# Ages within each band in the real data (18..29 and 30..59; every 60+ person is exactly 60).
BAND0_AGE_COUNTS = (192, 407, 267, 41, 58, 72, 62, 82, 44, 15, 25, 16)
BAND1_AGE_COUNTS = (17, 3, 7, 5, 13, 19, 8, 3, 14, 6, 20, 7, 13, 18, 13, 27, 14, 10, 39, 31,
                    80, 63, 78, 64, 82, 100, 123, 106, 159, 85)
MIN_PER_CELL = 2                    # people per gender x band once there are FLOOR_FROM persons:
FLOOR_FROM = 30                     # ... so all 18 classes exist in train and in eval
SUFFIX_SHARE = 41 / 2700            # ids like `000600-1` in the real data
PADDED_SHARE = 0.02                 # ids written with the folder's zero padding (`000123`)
EXT_WEIGHTS = {"jpg": 0.8, "jpeg": 0.1, "png": 0.1}  # mostly jpg, like the real archive
JPEG_QUALITY = 90                   # close to the real photos; keeps the set small
PNG_LEVEL = 1                       # noisy photos barely compress; level 1 is as small and faster
NOISE_MARGIN = 32                   # pixels of slack for cropping the noise field at an offset
SKIN_TONES = [(240, 208, 184), (228, 190, 160), (210, 165, 130), (246, 218, 198), (192, 148, 112)]
MASK_COLOURS = [(242, 242, 242), (168, 202, 236), (36, 36, 42), (236, 182, 198), (214, 200, 174)]
# Hair value per age band, before the per-photo gain of +-8%: gaps stay between the bands.
HAIR_VALUE = ((15, 55), (122, 158), (218, 245))
WRINKLES = (0, 2, 3)                # forehead lines per age band
FACE_ASPECT = 1.3                   # face half-height / half-width
DIFFICULTIES = ("easy", "real")
# --difficulty real (see the module docstring):
REAL_AGE_SD = 3.5                   # years: per-person spread of each age cue around the true age
REAL_APPARENT_60 = (60, 80)         # the 60+ band is written 60; its people look 60..80
REAL_HAIR = (22, 236)               # hair value at apparent age 18 and at 80 (linear between)
REAL_LONG_HAIR = {"female": 0.92, "male": 0.06}  # share with hair to the shoulders
REAL_BROW = {"female": (3.5, 1.0), "male": (6.5, 1.0)}  # eyebrow width: mean, sd (pixels)
REAL_NOISE = {"gender": 0.005, "age": 0.003, "mask": 0.01}  # shares of persons with a wrong label


def age_band(age):
    return 0 if age < 30 else 1 if age < 60 else 2


def label(mask, gender, age):
    """The competition's 18-class label: mask*6 + gender*3 + age band."""
    return mask * 6 + GENDERS.index(gender) * 3 + age_band(age)


def sample_persons(n, rng):
    """n people as dicts {gender, age}, in random order, following REAL_COUNTS and the age tables."""
    cells = [(g, b) for g in GENDERS for b in range(3)]
    p = np.array([REAL_COUNTS[g][b] for g, b in cells], dtype=float)
    floor = MIN_PER_CELL if n >= FLOOR_FROM else 0
    counts = floor + rng.multinomial(n - floor * len(cells), p / p.sum())
    ages = {0: (18, BAND0_AGE_COUNTS), 1: (30, BAND1_AGE_COUNTS), 2: (60, (1,))}
    persons = []
    for (gender, band), count in zip(cells, counts):
        first, table = ages[band]
        w = np.array(table, dtype=float)
        for age in first + rng.choice(len(w), size=count, p=w / w.sum()):
            persons.append({"gender": gender, "age": int(age)})
    return [persons[i] for i in rng.permutation(n)]


def assign_ids(persons, rng):
    """Give each person the real csv's id quirks; sets `id` (csv text) and `path` (folder name).

    Most ids lose the folder's zero padding, a few keep it, a few carry a `-1` suffix on the
    number of the person before them, and one pair of different people shares an id.
    """
    n = len(persons)
    kinds = ["plain"] * n
    odd = [k for k in range(1, n, 2)]  # specials sit at odd places so two never touch
    if n >= 10:
        # The shared pair needs two ages below 60 so one age can differ and the paths stay apart.
        fit = [k for k in odd if persons[k]["age"] < 60 and persons[k - 1]["age"] < 60]
        shared = int(rng.choice(fit)) if fit else 1  # `fit` is empty only for absurdly unlucky draws
        kinds[shared] = "shared"
        if persons[shared]["age"] == persons[shared - 1]["age"]:
            age = persons[shared]["age"]
            persons[shared]["age"] = age + 1 if age_band(age + 1) == age_band(age) else age - 1
        rest = [k for k in odd if k != shared]
        n_suffix = min(len(rest), max(1, round(n * SUFFIX_SHARE)))
        for k in rng.choice(rest, size=n_suffix, replace=False):
            kinds[k] = "suffix"
        plain = [k for k in range(n) if kinds[k] == "plain"]
        for k in rng.choice(plain, size=max(1, round(n * PADDED_SHARE)), replace=False):
            kinds[k] = "padded"
    number = 0
    for person, kind in zip(persons, kinds):
        if kind not in ("suffix", "shared"):
            number += int(rng.choice([1, 1, 1, 2, 3]))  # real ids have gaps
        folder_id = f"{number:06d}-1" if kind == "suffix" else f"{number:06d}"
        person["id"] = folder_id if kind in ("suffix", "padded") else str(number)
        person["path"] = f"{folder_id}_{person['gender']}_Asian_{person['age']}"
    return persons


def sample_look(rng, gender, age):
    """One person's identity: everything shared by their 7 photos."""
    band = age_band(age)
    v = rng.uniform(*HAIR_VALUE[band])
    tint = (rng.uniform(0, 22), rng.uniform(0, 10), 0) if band == 0 else rng.uniform(-4, 4, 3)
    top, bottom = rng.integers(110, 235, 3), rng.integers(90, 225, 3)
    rows = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    background = (top * (1 - rows) + bottom * rows).repeat(WIDTH, axis=1).astype(np.uint8)
    return {
        "female": gender == "female", "band": band,
        "hair": tuple(int(np.clip(v + t, 0, 255)) for t in tint),
        "skin": tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255))
                      for c in SKIN_TONES[rng.integers(len(SKIN_TONES))]),
        "clothes": tuple(int(c) for c in rng.integers(30, 230, 3)),
        "background": Image.fromarray(background),
        # One noise field per person, cropped at a random offset per photo: drawing fresh noise
        # for every photo would be most of the generation time.
        "noise": rng.standard_normal((HEIGHT + NOISE_MARGIN, WIDTH + NOISE_MARGIN, 3), dtype=np.float32),
        # Faces roughly centred, as in the real photos; the jitter makes cropping/augmenting matter.
        "cx": WIDTH / 2 + rng.normal(0, 10), "cy": 210 + rng.normal(0, 10), "fw": rng.uniform(70, 90),
    }


def sample_real_look(rng, gender, age):
    """sample_look() with the real task's difficulty: continuous age cues, overlapping gender cues,
    per-person face shape and lighting, more pose variation, subtle incorrect masks."""
    look = sample_look(rng, gender, age)
    apparent = age if age < 60 else rng.uniform(*REAL_APPARENT_60)
    grey = np.clip((apparent + rng.normal(0, REAL_AGE_SD) - 18) / (REAL_APPARENT_60[1] - 18), 0, 1)
    v = REAL_HAIR[0] + grey * (REAL_HAIR[1] - REAL_HAIR[0])
    tint = np.array([14, 6, 0]) * (1 - grey) + rng.uniform(-4, 4, 3)
    lines = apparent + rng.normal(0, REAL_AGE_SD)  # the wrinkles' own draw: two cues, two errors
    mean, sd = REAL_BROW[gender]
    look.update({
        "hair": tuple(int(np.clip(v + t, 0, 255)) for t in tint),
        "long_hair": bool(rng.random() < REAL_LONG_HAIR[gender]),
        "brow": float(np.clip(rng.normal(mean, sd), 2, 9)),
        "wrinkles": int(np.clip(np.round((lines - 28) / 9), 0, 4)),
        "wrinkle_shade": float(np.clip(0.9 - 0.007 * (lines - 28), 0.55, 0.9)),
        "aspect": rng.uniform(1.15, 1.45), "fw": rng.uniform(62, 92),
        "light": rng.uniform(0.85, 1.08) * rng.uniform(0.94, 1.06, 3),  # exposure and colour cast
        "scale_jitter": (0.9, 1.1), "shift": 9.0, "subtle_masks": True,
    })
    return look


def _shade(colour, f):
    return tuple(int(min(255, c * f)) for c in colour)


def _mask_box(rng, mask, cy, fw, fh):
    """(top, bottom, half width) of a mask: worn over nose and mouth, or clearly below the nose."""
    if mask == 0:  # over nose and mouth
        return cy + rng.uniform(-0.06, 0.02) * fh, cy + 0.95 * fh, 0.95 * fw
    if rng.random() < 0.7:  # pulled below the nose: nostrils show, mouth hidden
        return cy + rng.uniform(0.36, 0.44) * fh, cy + 1.05 * fh, 0.85 * fw
    return cy + rng.uniform(0.70, 0.76) * fh, cy + 1.14 * fh, 0.75 * fw  # on the chin: mouth shows too


def _subtle_mask_box(rng, mask, cy, fw, fh):
    """--difficulty real: worn masks sit a little higher or lower; most incorrect ones bare only
    the tip of the nose, the rest sit on the chin."""
    if mask == 0:
        return cy + rng.uniform(-0.08, 0.1) * fh, cy + rng.uniform(0.9, 1.0) * fh, rng.uniform(0.88, 0.98) * fw
    if rng.random() < 0.75:
        return cy + rng.uniform(0.16, 0.4) * fh, cy + rng.uniform(1.0, 1.08) * fh, rng.uniform(0.82, 0.95) * fw
    return cy + rng.uniform(0.62, 0.76) * fh, cy + 1.14 * fh, 0.75 * fw


def _draw_mask(d, rng, cx, cy, fw, fh, top, bottom, half):
    colour = MASK_COLOURS[rng.integers(len(MASK_COLOURS))]
    edge = _shade(colour, 0.7) if sum(colour) > 200 else (90, 90, 100)
    for side in (-1, 1):  # ear loops
        d.line([cx + side * half, top + 0.25 * (bottom - top), cx + side * fw, cy - 0.05 * fh],
               fill=edge, width=3)
    d.rounded_rectangle([cx - half, top, cx + half, bottom], radius=int(0.3 * (bottom - top)),
                        fill=colour, outline=edge, width=2)
    if rng.random() < 0.3:  # patterned mask: stripes or dots in a second colour
        ink = tuple(int(c) for c in rng.integers(0, 256, 3))
        for i in range(1, 5):
            y = top + i * (bottom - top) / 5
            if rng.random() < 0.5:
                d.line([cx - half + 12, y, cx + half - 12, y], fill=ink, width=3)
            else:
                for x in np.linspace(cx - half + 20, cx + half - 20, 6):
                    d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=ink)


def draw_person_photo(look, mask, rng):
    """A 384x512 RGB cartoon photo of `look` with mask state `mask` (0 wear, 1 incorrect, 2 none)."""
    s = rng.uniform(*look.get("scale_jitter", (0.97, 1.03)))  # pose jitter between the 7 photos
    shift = look.get("shift", 4)
    cx, cy = look["cx"] + rng.normal(0, shift), look["cy"] + rng.normal(0, shift)
    fw = look["fw"] * s
    fh = fw * look.get("aspect", FACE_ASPECT)
    long_hair = look.get("long_hair", look["female"])
    hair, skin = look["hair"], look["skin"]
    img = look["background"].copy()
    d = ImageDraw.Draw(img)
    d.ellipse([cx - 175 * s, cy + fh + 30 * s, cx + 175 * s, cy + fh + 330 * s], fill=look["clothes"])
    if long_hair:  # long hair behind the head, falling onto both shoulders
        d.ellipse([cx - fw - 20 * s, cy - fh - 22 * s, cx + fw + 20 * s, cy + 0.4 * fh], fill=hair)
        d.rounded_rectangle([cx - fw - 28 * s, cy - 0.3 * fh, cx + fw + 28 * s, cy + fh + 95 * s],
                            radius=int(30 * s), fill=hair)
    else:  # short hair: a cap that the face hides below the ears
        d.ellipse([cx - fw - 7 * s, cy - fh - 16 * s, cx + fw + 7 * s, cy + 0.1 * fh], fill=hair)
    d.rectangle([cx - 0.35 * fw, cy + 0.6 * fh, cx + 0.35 * fw, cy + fh + 45 * s], fill=_shade(skin, 0.9))
    for side in (-1, 1):  # ears
        d.ellipse([cx + side * fw - 14 * s, cy - 0.2 * fh, cx + side * fw + 14 * s, cy + 0.2 * fh], fill=skin)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw, cy - 1.08 * fh, cx + fw, cy - 0.2 * fh], 180, 360, fill=hair)  # fringe
    for i in range(look.get("wrinkles", WRINKLES[look["band"]])):
        y = cy - (0.38 + 0.08 * i) * fh
        d.line([cx - 0.45 * fw, y, cx + 0.45 * fw, y], fill=_shade(skin, look.get("wrinkle_shade", 0.62)), width=3)
    brow = round(look.get("brow", 7 if not look["female"] else 3))
    for side in (-1, 1):
        ex, ey = cx + side * 0.4 * fw, cy - 0.12 * fh
        d.line([cx + side * 0.2 * fw, ey - 0.15 * fh, cx + side * 0.62 * fw, ey - 0.17 * fh],
               fill=_shade(hair, 0.85), width=brow)
        d.ellipse([ex - 14 * s, ey - 8 * s, ex + 14 * s, ey + 8 * s], fill=(250, 250, 250))
        d.ellipse([ex - 5 * s, ey - 5 * s, ex + 5 * s, ey + 5 * s], fill=(30, 25, 20))
        d.ellipse([cx + side * 0.09 * fw - 4 * s, cy + 0.26 * fh, cx + side * 0.09 * fw + 4 * s,
                   cy + 0.31 * fh], fill=_shade(skin, 0.45))  # nostril
    d.polygon([(cx, cy - 0.02 * fh), (cx - 0.14 * fw, cy + 0.28 * fh), (cx + 0.14 * fw, cy + 0.28 * fh)],
              fill=_shade(skin, 0.82))
    d.ellipse([cx - 0.26 * fw, cy + 0.52 * fh, cx + 0.26 * fw, cy + 0.64 * fh], fill=(155, 55, 60))
    if long_hair:  # thin side locks over the face edges frame the face down to the shoulders
        for side in (-1, 1):
            d.chord([cx + side * fw - 16 * s, cy - 0.8 * fh, cx + side * fw + 16 * s, cy + 0.9 * fh],
                    180 - side * 90, 360 - side * 90, fill=hair)  # the half that lies on the face
    if mask < 2:
        box = _subtle_mask_box if look.get("subtle_masks") else _mask_box
        _draw_mask(d, rng, cx, cy, fw, fh, *box(rng, mask, cy, fw, fh))
    # Camera differences: a slight gain change and sensor noise (and the person's lighting).
    pixels = np.asarray(img, dtype=np.float32) * rng.uniform(0.92, 1.08)
    if "light" in look:
        pixels *= look["light"].astype(np.float32)
    y, x = rng.integers(NOISE_MARGIN, size=2)
    pixels += look["noise"][y:y + HEIGHT, x:x + WIDTH] * rng.uniform(2, 6)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_person(job):
    """Draw and save one person's photos; its own seed keeps the output independent of workers."""
    seed_seq, gender, age, files, difficulty = job
    rng = np.random.default_rng(seed_seq)
    look = (sample_real_look if difficulty == "real" else sample_look)(rng, gender, age)
    for path, mask in files:
        fmt = "PNG" if path.suffix == ".png" else "JPEG"
        options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {"compress_level": PNG_LEVEL}
        draw_person_photo(look, mask, rng).save(path, fmt, **options)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def plant_label_noise(persons, rng):
    """--difficulty real: give REAL_NOISE's shares of persons a wrong gender, a wrong age band or
    swapped incorrect_mask/normal photos. Sets `true_gender`/`true_age` (what the photos show)
    and `swap_masks`; `gender`/`age` become what train.csv says."""
    for person in persons:
        person.update(true_gender=person["gender"], true_age=person["age"], swap_masks=False)
    n = len(persons)
    picks = rng.permutation(n)
    counts = {kind: int(round(n * share)) for kind, share in REAL_NOISE.items()}
    start = 0
    for kind, count in counts.items():
        for k in picks[start:start + count]:
            person = persons[k]
            if kind == "gender":
                person["gender"] = GENDERS[1 - GENDERS.index(person["gender"])]
            elif kind == "age":  # into a neighbouring band
                person["age"] = _neighbour_band_age(person["age"], rng)
            else:
                person["swap_masks"] = True
        start += count
    return persons


def _neighbour_band_age(age, rng):
    band = age_band(age)
    if band == 1:
        return 60 if rng.random() < 0.5 else int(rng.integers(22, 30))
    return int(rng.integers(30, 40)) if band == 0 else int(rng.integers(50, 60))


def _shown_mask(person, mask):
    """The mask state a photo shows: a swapped person's incorrect_mask and normal photos trade places."""
    return 3 - mask if person["swap_masks"] and mask > 0 else mask


def _noise_rows(person, files):
    """label_noise.csv's rows for one person: path under images/, label written, true label."""
    rows = []
    for path, mask in files:
        shown = _shown_mask(person, mask)
        written, true = label(mask, person["gender"], person["age"]), label(shown, person["true_gender"], person["true_age"])
        if written != true:
            rows.append((f"{path.parent.name}/{path.name}", written, true))
    return rows


def _train_jobs(folder, n, seq, difficulty="easy"):
    meta_seq, *person_seqs = seq.spawn(n + 1)
    rng = np.random.default_rng(meta_seq)
    persons = sample_persons(n, rng)
    if difficulty == "real":
        persons = plant_label_noise(persons, rng)
    persons = assign_ids(persons, rng)
    exts = rng.choice(list(EXT_WEIGHTS), size=n, p=list(EXT_WEIGHTS.values()))
    photo_exts = [[e] * len(PHOTOS) for e in exts]
    if n >= 20:  # make sure jpeg folders, png folders and one mixed folder all exist
        a, b, c = rng.choice(n, size=3, replace=False)
        photo_exts[a], photo_exts[b] = ["jpeg"] * len(PHOTOS), ["png"] * len(PHOTOS)
        photo_exts[c] = [list(EXT_WEIGHTS)[i % 3] for i in range(len(PHOTOS))]
    images = folder / "images"
    jobs, noise = [], []
    for person, ext, seed_seq in zip(persons, photo_exts, person_seqs):
        (images / person["path"]).mkdir(parents=True)
        files = [(images / person["path"] / f"{stem}.{e}", mask) for (stem, mask), e in zip(PHOTOS, ext)]
        if difficulty == "real":
            noise += _noise_rows(person, files)
            drawn = [(path, _shown_mask(person, mask)) for path, mask in files]
            jobs.append((seed_seq, person["true_gender"], person["true_age"], drawn, difficulty))
        else:
            jobs.append((seed_seq, person["gender"], person["age"], files, difficulty))
    # macOS archive junk that readers must skip (names starting with ".").
    junk_folder = images / persons[int(rng.integers(n))]["path"]
    (junk_folder / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07" + rng.bytes(28))
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + rng.bytes(24))
    _write_csv(folder / "train.csv", ["id", "gender", "race", "age", "path"],
               [(p["id"], p["gender"], "Asian", p["age"], p["path"]) for p in persons])
    if difficulty == "real":
        _write_csv(folder / "label_noise.csv", ["path", "label", "true_label"], noise)
    return jobs


def _eval_jobs(folder, n, seq, difficulty="easy"):
    meta_seq, *person_seqs = seq.spawn(n + 1)
    rng = np.random.default_rng(meta_seq)
    (folder / "images").mkdir(parents=True)
    jobs, rows, owners = [], [], []
    for k, (person, seed_seq) in enumerate(zip(sample_persons(n, rng), person_seqs)):
        names = [rng.bytes(20).hex() + ".jpg" for _ in PHOTOS]  # sha1-like, as in the competition
        rows += [(name, label(mask, person["gender"], person["age"])) for name, (_, mask) in zip(names, PHOTOS)]
        owners += [(name, f"eval{k:05d}") for name in names]
        jobs.append((seed_seq, person["gender"], person["age"],
                     [(folder / "images" / name, mask) for name, (_, mask) in zip(names, PHOTOS)], difficulty))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # the order must not give persons away
    _write_csv(folder / "info.csv", ["ImageID", "ans"], [(name, 0) for name, _ in rows])
    _write_csv(folder / "answers.csv", ["ImageID", "ans"], rows)
    # who is on each photo (the competition does not say; persons.py and the tests measure grouping with it)
    _write_csv(folder / "persons.csv", ["ImageID", "person"], sorted(owners))
    return jobs


def generate(out, persons=300, eval_persons=150, seed=0, overwrite=False, workers=2, difficulty="easy"):
    """Write OUT/train and OUT/eval; replace them only with `overwrite`. Returns the two paths."""
    out = Path(out)
    if difficulty not in DIFFICULTIES:
        raise cli.UserError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty}")
    if persons < 1 or eval_persons < 1:
        raise cli.UserError(f"persons and eval persons must be >= 1, got {persons} and {eval_persons}")
    if seed < 0:
        raise cli.UserError(f"seed must be >= 0, got {seed}")
    targets = [out / "train", out / "eval"]
    for target in targets:
        if target.exists() and not overwrite:
            raise cli.UserError(f"{target} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end, so a crash never leaves a half dataset.
    tmp = Path(tempfile.mkdtemp(prefix=".make_sample_data-", dir=out))
    try:
        train_seq, eval_seq = np.random.SeedSequence(seed).spawn(2)  # disjoint streams: disjoint identities
        jobs = (_train_jobs(tmp / "train", persons, train_seq, difficulty)
                + _eval_jobs(tmp / "eval", eval_persons, eval_seq, difficulty))
        bar = cli.progress(total=len(jobs), desc="persons", unit="person")
        if workers > 1:
            # spawn, not fork: a fork after torch or a test runner started threads can leave a worker
            # holding a lock no thread will release, and Pool's exit then waits on it forever.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_person, jobs, chunksize=8):
                    bar.update(1)
        else:
            for job in jobs:
                _write_person(job)
                bar.update(1)
        bar.close()
        for target in targets:
            if target.exists():
                target.rename(tmp / f"old-{target.name}")
            (tmp / target.name).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


def get_args_parser():
    parser = cli.ArgumentParser("make_sample_data.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data",
                        help="folder that receives train/ and eval/ (data: where train.py and inference.py look)")
    parser.add_argument("--persons", type=cli.positive_int, default=300,
                        help="train persons (7 photos each); 300 is enough for a tiny CNN to reach F1 0.9")
    parser.add_argument("--eval_persons", type=cli.positive_int, default=150,
                        help="eval persons; half of train, enough for a stable macro F1 over 18 classes")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    cli.bool_flag(parser, "--overwrite", help="replace existing OUT/train and OUT/eval (off: never lose data silently)")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="easy",
                        help="easy: clear cues (fast tests, the demo); real: as hard as the real task "
                             "(continuous age, subtle masks, memorable persons, ~1%% wrong train labels)")
    parser.add_argument("--workers", type=cli.positive_int, default=2,
                        help="drawing processes (2: the small dev machines); the output does not depend on it")
    return parser


def main(args):
    start = time.perf_counter()
    train, eval_ = generate(args.out, args.persons, args.eval_persons, args.seed, args.overwrite, args.workers,
                            args.difficulty)
    n_photos = len(PHOTOS)
    print(f"wrote {args.persons} train persons ({args.persons * n_photos} images) to {train} and "
          f"{args.eval_persons} eval persons ({args.eval_persons * n_photos} images) to {eval_} "
          f"in {time.perf_counter() - start:.1f}s")
    noise = os.path.join(train, "label_noise.csv")
    if args.difficulty == "real" and os.path.isfile(noise):
        with open(noise) as f:
            wrong = sum(1 for _ in f) - 1
        print(f"planted {wrong} wrong training labels ({wrong / (args.persons * n_photos):.1%} of the images; the "
              f"real data has about 1%), listed in {noise}: audit.py --planted {noise} measures how many an audit "
              f"finds; eval answers are true")


if __name__ == "__main__":
    cli.run(main, get_args_parser)
