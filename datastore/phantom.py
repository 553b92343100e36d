"""Synthetic female pelvic CT phantom labelled with the cervix model's structures.

SYNTHETIC DATA. Nothing here comes from a patient. The phantom exists so that tests,
benchmarks and the demo weights have unlimited, reproducible, correctly labelled
volumes. It looks roughly like a planning CT (HU values, anatomy, noise) but a model
trained on it is not a clinical model.

Anatomy: body outline (subcutaneous fat, muscle), a fat-filled pelvic cavity holding the
uterus, cervix and vagina (random size, position, anteversion and lateral tilt), a bladder of
variable filling, a rectum with gas, pelvic bones (iliac wings, sacrum, femoral heads and
necks, pubic rami), a sigmoid colon rising from the rectum to the left iliac fossa in its fat
sheath; above the pelvis lumbar spine, psoas, kidneys, liver and small-bowel loops. Partial-volume
blur and correlated noise of 10-22 HU.

Anatomy is defined in millimetres in patient RAS space (x: left->right, so +x is the patient's
RIGHT and -x the LEFT, as in NIfTI/nibabel world coordinates; y: posterior->anterior,
z: inferior->superior), origin near the pelvic centre, so the same seed gives the same patient
at any matrix size and spacing. The liver and the right femoral head lie at +x; the sigmoid (in
the left iliac fossa, towards the descending colon) and the left femoral head at -x. Exported as
DICOM (LPS: +x is the patient's left) the left femoral head has a positive x, as in a clinical
RTSTRUCT.

The label is a label map of the cervix model's structures, each voxel the value of the one
structure it is in (``structures.CERVIX`` order: CTV=1, Bladder=2, Rectum=3, Femur_Head_L=4,
Femur_Head_R=5, Colon_Sigmoid=6, Bag_Bowel=7). The rules make the structures disjoint, so the
label map holds each of them whole. Rules (stated once, here):

    CTV           core = uterus + cervix + upper vagina (the upper 20 mm of the vaginal tube);
                  CTV = core grown by a parametrial margin (10 mm left-right, 5 mm antero-posterior
                  and cranio-caudal), kept inside the pelvic cavity, minus bone, bladder and rectum.
    Bladder       the urine-filled bladder, minus rectum and bone.
    Rectum        the rectal tube (wall and lumen with its gas and stool), minus bone.
    Femur_Head_L  the spherical head of the left femur (patient's left, -x in RAS), cortex and
    Femur_Head_R  marrow; likewise the right (+x). The neck below the head is bone but no structure.
    Colon_Sigmoid the sigmoid tube (wall and lumen) from the top of the rectum to the left iliac
                  fossa, minus CTV, bladder, rectum and bone.
    Bag_Bowel     the peritoneal space holding the small-bowel loops: the loops and the fat within
                  10 mm of them, inside the abdominal cavity (not liver, kidneys, psoas, body wall),
                  minus bone and all of the structures above.

A seed gives the same CTV, bladder, rectum and bones as before the organs at risk were labelled
(the sigmoid's shape comes from a random stream of its own), mirrored since the laterality fix:

Laterality fix: the anatomy used to be drawn with +x as the patient's left, so every phantom was a
mirror image (liver on the left, sigmoid on the right) whose right femoral head was labelled
Femur_Head_L. Every lateral coordinate is now negated and the random draws are unchanged, so a seed
gives exactly the left-right mirror image of its phantom before the fix (noise included), with
Femur_Head_L and Femur_Head_R where they belong. Weights trained on phantoms made before the fix
learnt the mirror image (they call the patient's right femoral head Femur_Head_L): retrain them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctv_app.lib.structures import CERVIX, Structures

AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
URINE_HU = 8.0
GAS_HU = -900.0
CORTICAL_HU = 900.0
TRABECULAR_HU = 250.0

UPPER_VAGINA_MM = 20.0
PARAMETRIAL_MARGIN_MM = (10.0, 5.0, 5.0)  # x (lateral), y (AP), z (SI)

SMALL_SHAPE = (112, 96, 64)
SMALL_SPACING = (3.5, 3.5, 5.0)
FULL_SHAPE = (512, 512, 120)
FULL_SPACING = (0.977, 0.977, 3.0)

# The label map's structures and values (``CERVIX`` order, value = position + 1).
STRUCTURES = Structures(CERVIX)
FEMUR_HEAD_RADIUS_MM = 24.0
BOWEL_BAG_MARGIN_MM = 10.0
# Lateral directions in RAS: +x is the patient's right. A lateral coordinate is written
# ``LEFT * d`` for ``d`` mm towards the patient's left (negative d: towards the right).
RIGHT, LEFT = 1.0, -1.0


@dataclass
class Phantom:
    """One synthetic case: ``image`` in HU and ``label`` (a label map of ``STRUCTURES``), both indexed (i, j, k)."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8 label map, STRUCTURES' values (CTV=1)
    affine: np.ndarray  # 4x4 voxel -> RAS mm, LPS-ordered axes like a DICOM-derived NIfTI
    seed: int

    def mask(self, name: str) -> np.ndarray:
        """One structure's voxels (boolean)."""
        return self.label == STRUCTURES.value(name)


class _Grid:
    """Physical coordinates of a diagonal-affine grid, evaluated lazily inside bounding boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], z_offset: float = 0.0):
        # Axes stored LPS-ordered (x and y decrease with index) as most CT NIfTI files are.
        self.shape = shape
        self.axes = [
            -(np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing[0],
            -(np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing[1],
            (np.arange(shape[2]) - (shape[2] - 1) / 2.0) * spacing[2] + z_offset,
        ]
        self.spacing = spacing

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([-self.spacing[0], -self.spacing[1], self.spacing[2], 1.0])
        aff[:3, 3] = [self.axes[0][0], self.axes[1][0], self.axes[2][0]]
        return aff

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index slices covering the physical box [lo, hi] and the broadcastable coordinates inside."""
        slices, coords = [], []
        for d in range(3):
            ax = self.axes[d]
            inside = np.nonzero((ax >= lo[d]) & (ax <= hi[d]))[0]
            if inside.size == 0:
                sl = slice(0, 0)
            else:
                sl = slice(int(inside[0]), int(inside[-1]) + 1)
            slices.append(sl)
            c = ax[sl].astype(np.float32)
            shape = [1, 1, 1]
            shape[d] = c.size
            coords.append(c.reshape(shape))
        return tuple(slices), coords


def _rotation(tilt_x_deg: float, tilt_y_deg: float) -> np.ndarray:
    ax, ay = np.deg2rad(tilt_x_deg), np.deg2rad(tilt_y_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


class _Painter:
    def __init__(self, grid: _Grid):
        self.grid = grid

    def ellipsoid(self, center, radii, rot=None, reach=None) -> tuple[tuple[slice, ...], np.ndarray]:
        center, radii = np.asarray(center, float), np.asarray(radii, float)
        r = radii.max() if reach is None else reach
        sl, (x, y, z) = self.grid.box(center - r, center + r)
        dx, dy, dz = x - center[0], y - center[1], z - center[2]
        if rot is not None:
            # body-frame coordinates = R^T (p - c)
            u = rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz
            v = rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz
            w = rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz
        else:
            u, v, w = dx, dy, dz
        return sl, (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2 <= 1.0

    def capsule(self, p0, p1, radius: float, flatten=(1.0, 1.0)) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
        """Segment p0->p1 with a (possibly elliptic) section; also returns the axial parameter t in [0,1]."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        lo = np.minimum(p0, p1) - radius * max(flatten)
        hi = np.maximum(p0, p1) + radius * max(flatten)
        sl, (x, y, z) = self.grid.box(lo, hi)
        d = p1 - p0
        length2 = float(d @ d)
        t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        ex = (x - (p0[0] + t * d[0])) / flatten[0]
        ey = (y - (p0[1] + t * d[1])) / flatten[1]
        ez = z - (p0[2] + t * d[2])
        return sl, ex**2 + ey**2 + ez**2 <= radius**2, t


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = SMALL_SHAPE,
    spacing: tuple[float, float, float] = SMALL_SPACING,
) -> Phantom:
    """Build one deterministic phantom: same ``seed`` -> same anatomy at any shape/spacing."""
    rng = np.random.default_rng(seed)
    # Where the scan starts and stops varies between patients: shift the field of view in z.
    z_offset = np.random.default_rng([seed, 1]).uniform(-30.0, 50.0)
    grid = _Grid(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), z_offset)
    paint = _Painter(grid)
    img = np.full(grid.shape, AIR_HU, dtype=np.float32)
    organ = {
        k: np.zeros(grid.shape, dtype=bool)
        for k in (
            "cavity", "bone", "bladder", "rectum", "uterus", "cervix", "vagina_upper",
            "abdomen", "solid", "bowel", "Femur_Head_L", "Femur_Head_R",
        )
    }  # fmt: skip

    def put(mask_sl, value, name=None):
        sl, m = mask_sl[0], mask_sl[1]
        img[sl][m] = value
        if name:
            organ[name][sl] |= m

    def clear(name, mask_sl):
        sl, m = mask_sl[0], mask_sl[1]
        organ[name][sl] &= ~m

    size = rng.uniform(0.9, 1.12)

    # Body outline (fat) with muscle inside: elliptic cylinders.
    body_a, body_b = 175.0 * size, 125.0 * size
    fat = rng.uniform(12.0, 35.0)
    put(paint.ellipsoid((0, 5, 0), (body_a, body_b, 1e4)), FAT_HU)
    put(paint.ellipsoid((0, 5, 0), (body_a - fat, body_b - fat, 1e4)), MUSCLE_HU)
    # Pelvic cavity: fat-filled space where the organs sit, narrowing towards the floor.
    cav_c = np.array([0.0, 0.0, -5.0])
    cav_r = np.array([68.0, 55.0, 95.0]) * size
    put(paint.ellipsoid(cav_c, cav_r), FAT_HU + 10.0, "cavity")

    def bone(outer, inner):
        """Cortical shell around a trabecular core."""
        put(outer, CORTICAL_HU, "bone")
        put(inner, TRABECULAR_HU)

    _paint_abdomen(paint, put, bone, rng, size)

    # Vagina, cervix, uterus along a tilted axis (anteversion + lateral tilt).
    ante = rng.uniform(15.0, 60.0)
    lat = rng.uniform(-15.0, 15.0)  # degrees, positive tips the fundus to the patient's left
    rot = _rotation(-ante, LEFT * lat)  # positive anteversion tips the fundus anteriorly
    axis = rot @ np.array([0.0, 0.0, 1.0])
    os_pt = np.array([LEFT * rng.uniform(-12, 12), rng.uniform(-12, 6), rng.uniform(-35, -15)])  # external os
    vag_len = rng.uniform(55.0, 75.0)
    vag_top = os_pt + np.array([0.0, -3.0, 5.0])
    vag_bot = vag_top + np.array([0.0, 8.0, -vag_len])
    vag_sl, vag_m, vag_t = paint.capsule(vag_bot, vag_top, rng.uniform(9.0, 12.0), flatten=(1.6, 0.6))
    put((vag_sl, vag_m), MUSCLE_HU - 5.0)
    upper = vag_m & (vag_t >= 1.0 - UPPER_VAGINA_MM / vag_len)
    organ["vagina_upper"][vag_sl] |= upper

    tissue_hu = rng.uniform(55.0, 85.0)
    cx_len = rng.uniform(25.0, 35.0)
    cx_r = rng.uniform(11.0, 16.0)
    cx_top = os_pt + axis * cx_len
    put(paint.capsule(os_pt, cx_top, cx_r)[:2], tissue_hu - 10.0, "cervix")
    ut_r = np.array([rng.uniform(24, 36), rng.uniform(16, 25), rng.uniform(30, 45)])
    ut_c = cx_top + axis * (ut_r[2] * 0.8)
    put(paint.ellipsoid(ut_c, ut_r, rot), tissue_hu, "uterus")

    # Bladder: variable filling, anterior-inferior to the uterus; it pushes the organs aside.
    fill = rng.uniform(0.55, 1.35)
    bl_r = np.array([38.0, 30.0, 26.0]) * fill
    bl_c = np.array([LEFT * rng.uniform(-8, 8), 42.0 + 10 * fill, -28.0 + 12 * fill])
    bl = paint.ellipsoid(bl_c, bl_r)
    put(bl, URINE_HU, "bladder")
    for name in ("uterus", "cervix", "vagina_upper"):
        clear(name, bl)

    # Rectum: posterior tube, muscular wall, gas and stool in the lumen.
    rc_r = rng.uniform(11.0, 17.0)
    rc_pts = [
        np.array([0.0, -35.0, -80.0]),
        np.array([LEFT * rng.uniform(-6, 6), -48.0, 0.0]),
        np.array([LEFT * rng.uniform(-25, -10), -35.0, 45.0]),  # 10-25 mm to the patient's right
    ]
    gas = rng.uniform(0.2, 0.9)
    for p0, p1 in zip(rc_pts[:-1], rc_pts[1:]):
        wall = paint.capsule(p0, p1, rc_r)
        put(wall[:2], MUSCLE_HU, "rectum")
        for name in ("uterus", "cervix", "vagina_upper"):
            clear(name, wall)
        lumen_sl, lumen_m, lumen_t = paint.capsule(p0, p1, rc_r - 3.0)
        put((lumen_sl, lumen_m), -40.0)
        # Gas rises to the anterior (non-dependent) side of the lumen.
        y = grid.axes[1][lumen_sl[1]].reshape(1, -1, 1)
        gas_m = lumen_m & (y > (p0[1] + p1[1]) / 2 + rc_r * (1 - 2 * gas))
        put((lumen_sl, gas_m), GAS_HU)

    # Pelvic bones are painted after the soft tissue so that they win where shapes overlap.
    for side in (RIGHT, LEFT):
        fh_c = np.array([side * 92.0 * size, 8.0, -60.0])
        head = paint.ellipsoid(fh_c, (FEMUR_HEAD_RADIUS_MM,) * 3)
        bone(head, paint.ellipsoid(fh_c, (20, 20, 20)))
        organ["Femur_Head_L" if side == LEFT else "Femur_Head_R"][head[0]] |= head[1]  # -x is the patient's left
        neck_end = fh_c + np.array([side * 45.0, -5.0, -45.0])
        bone(paint.capsule(fh_c, neck_end, 15.0)[:2], paint.capsule(fh_c, neck_end, 11.0)[:2])
        # Superior pubic ramus towards the symphysis.
        sym = np.array([side * 8.0, 70.0 * size, -62.0])
        bone(
            paint.capsule(fh_c + np.array([-side * 15, 20, 0]), sym, 9.0)[:2],
            paint.capsule(fh_c + np.array([-side * 15, 20, 0]), sym, 6.0)[:2],
        )
        # Iliac wing: a curved plate (sector of an elliptic shell) above the acetabulum.
        wc = np.array([side * 30.0, -10.0, 70.0])
        outer = paint.ellipsoid(wc, (105 * size, 70, 60), reach=110.0)
        inner = paint.ellipsoid(wc, (95 * size, 60, 62), reach=110.0)
        sl, m = outer
        x, y, z = (grid.axes[d][sl[d]].reshape([-1 if e == d else 1 for e in range(3)]) for d in range(3))
        sector = (side * x > side * wc[0] + 25) & (y < wc[1] + 45) & (z > 20)
        plate = m & ~inner[1] & sector
        put((sl, plate), CORTICAL_HU, "bone")
    # Sacrum: flattened ellipsoid tilted forward, behind the rectum.
    sac_rot = _rotation(-30.0, 0.0)
    sac_c = np.array([0.0, -72.0 * size, 35.0])
    bone(paint.ellipsoid(sac_c, (45, 14, 65), sac_rot), paint.ellipsoid(sac_c, (41, 10, 61), sac_rot))

    # CTV from the organ masks, by the rule in the module docstring.
    core = organ["uterus"] | organ["cervix"] | organ["vagina_upper"]
    sampling = tuple(s / m for s, m in zip(grid.spacing, PARAMETRIAL_MARGIN_MM))
    grown = ndimage.distance_transform_edt(~core, sampling=sampling) <= 1.0 if core.any() else core
    ctv = grown & organ["cavity"] & ~organ["bone"] & ~organ["bladder"] & ~organ["rectum"]
    ctv |= core & ~organ["bladder"] & ~organ["rectum"] & ~organ["bone"]

    # Organs at risk, by the rules in the module docstring; painted last so that the image shows
    # exactly what is labelled (the sigmoid yields to the CTV, bladder, rectum and bone).
    bladder = organ["bladder"] & ~organ["rectum"] & ~organ["bone"]
    rectum = organ["rectum"] & ~organ["bone"]
    taken = ctv | organ["bladder"] | organ["rectum"] | organ["bone"]
    sigmoid = _paint_sigmoid(paint, img, taken, organ["bowel"], rc_pts[-1], np.random.default_rng([seed, 2]))
    bag = _bowel_bag(grid, organ, taken | sigmoid)
    masks = {
        "CTV": ctv, "Bladder": bladder, "Rectum": rectum, "Femur_Head_L": organ["Femur_Head_L"],
        "Femur_Head_R": organ["Femur_Head_R"], "Colon_Sigmoid": sigmoid, "Bag_Bowel": bag,
    }  # fmt: skip
    label = np.zeros(grid.shape, dtype=np.uint8)
    for name in STRUCTURES.names:
        label[masks[name]] = STRUCTURES.value(name)

    # Scanner: partial-volume blur (~1.2 mm) then correlated quantum noise.
    blur = [1.2 / s for s in grid.spacing]
    img = ndimage.gaussian_filter(img, blur, truncate=2.0)
    noise_sd = rng.uniform(10.0, 22.0)
    # Drawn in the voxel order of the pre-fix (mirrored) phantom, so that a seed's noise is mirrored too.
    noise = rng.standard_normal(grid.shape, dtype=np.float32)[::-1]
    noise = ndimage.gaussian_filter(noise, [0.6 / s for s in grid.spacing], truncate=2.0)
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    img = img + noise * (img > -800)  # little noise in air, as on a real scanner after reconstruction
    return Phantom(
        image=np.clip(np.rint(img), -1024, 3071).astype(np.int16),
        label=label,
        affine=grid.affine,
        seed=seed,
    )


def _paint_sigmoid(
    paint: _Painter, img: np.ndarray, taken: np.ndarray, bowel: np.ndarray, start: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The sigmoid colon: a tube from the top of the rectum (``start``) up over the pelvic organs and
    down to the left iliac fossa, in a fat sheath (its mesocolon) that leaves the small-bowel loops
    (``bowel``) visible; painted where ``taken`` is not.
    Returns its mask. Its own random stream (``rng``) leaves the rest of the phantom as it was."""
    grid = paint.grid
    radius = rng.uniform(10.0, 14.0)
    # Control points (RAS mm, the patient's left at -x): rising behind the uterus, crossing to the
    # left above it, looping down into the left iliac fossa and up again towards the descending colon.
    ctrl = np.array([
        start,
        start + [LEFT * rng.uniform(0, 10), rng.uniform(0, 10), rng.uniform(28, 38)],
        [LEFT * rng.uniform(5, 30), rng.uniform(-25, -5), rng.uniform(100, 120)],
        [LEFT * rng.uniform(45, 65), rng.uniform(-15, 5), rng.uniform(75, 95)],
        [LEFT * rng.uniform(60, 75), rng.uniform(-25, -10), rng.uniform(110, 130)],
    ])  # fmt: skip
    path = _catmull_rom(ctrl, 6)
    gas = rng.uniform(0.0, 0.8)
    content_hu = rng.uniform(-60.0, 20.0)  # stool and fluid
    sigmoid = np.zeros(grid.shape, dtype=bool)

    def put(mask_sl, value, keep=taken):
        sl, m = mask_sl[0], mask_sl[1] & ~keep[mask_sl[0]]
        img[sl][m] = value
        return sl, m

    segments = list(zip(path[:-1], path[1:]))
    for p0, p1 in segments:
        put(paint.capsule(p0, p1, radius + 8.0)[:2], FAT_HU, taken | bowel)
    for p0, p1 in segments:
        sl, m = put(paint.capsule(p0, p1, radius)[:2], MUSCLE_HU)
        sigmoid[sl] |= m
    for p0, p1 in segments:
        lumen_sl, lumen_m = paint.capsule(p0, p1, radius - 3.0)[:2]
        put((lumen_sl, lumen_m), content_hu)
        y = grid.axes[1][lumen_sl[1]].reshape(1, -1, 1)
        put((lumen_sl, lumen_m & (y > (p0[1] + p1[1]) / 2 + radius * (1 - 2 * gas))), GAS_HU)
    return sigmoid


def _catmull_rom(points: np.ndarray, per_segment: int) -> np.ndarray:
    """A smooth (Catmull-Rom) curve through ``points``, ends padded by reflection, ``per_segment`` steps each."""
    pts = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    out = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[i - 1 : i + 3]
        for t in np.linspace(0.0, 1.0, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (3 * p1 - p0 - 3 * p2 + p3) * t3)
            )
    out.append(points[-1])
    return np.array(out)


def _bowel_bag(grid: _Grid, organ: dict[str, np.ndarray], taken: np.ndarray) -> np.ndarray:
    """Bag_Bowel by its rule: the loops and the peritoneal fat within ``BOWEL_BAG_MARGIN_MM`` of them,
    minus ``taken`` (the other structures and bone)."""
    loops = organ["bowel"] & ~taken
    if not loops.any():
        return loops
    # Grow inside the loops' bounding box padded by the margin (the full grid's distance map costs seconds).
    pad = [int(np.ceil(BOWEL_BAG_MARGIN_MM / s)) + 1 for s in grid.spacing]
    idx = np.nonzero(loops.any(axis=(1, 2))), np.nonzero(loops.any(axis=(0, 2))), np.nonzero(loops.any(axis=(0, 1)))
    box = tuple(
        slice(max(int(i[0][0]) - p, 0), min(int(i[0][-1]) + 1 + p, n)) for i, p, n in zip(idx, pad, grid.shape)
    )
    near = ndimage.distance_transform_edt(~loops[box], sampling=grid.spacing) <= BOWEL_BAG_MARGIN_MM
    peritoneal = (organ["abdomen"] | organ["cavity"]) & ~organ["solid"]
    bag = loops.copy()
    bag[box] |= near & peritoneal[box]
    return bag & ~taken


def _paint_abdomen(paint: _Painter, put, bone, rng: np.random.Generator, size: float) -> None:
    """Above the pelvis: lumbar spine, liver, kidneys and small-bowel loops (organ masks "abdomen": the
    abdominal cavity, "solid": liver, kidneys and psoas, "bowel": the loops).

    The liver's HU overlaps the uterus's on purpose: a model must use context, not intensity.
    """
    put(paint.ellipsoid((0, 5, 215), (140 * size, 95 * size, 130)), FAT_HU + 5.0, "abdomen")
    for z in np.arange(110.0, 420.0, 34.0):  # vertebral bodies with discs between them
        c = np.array([0.0, -55.0 * size, z])
        bone(
            paint.capsule(c - [0, 0, 12], c + [0, 0, 12], 19.0)[:2],
            paint.capsule(c - [0, 0, 12], c + [0, 0, 12], 15.0)[:2],
        )
        put(paint.capsule(c + [0, -22, -8], c + [0, -38, -8], 7.0)[:2], CORTICAL_HU, "bone")  # spinous process
    for side in (RIGHT, LEFT):
        put(paint.ellipsoid((side * 38.0, -38.0 * size, 200.0), (16, 18, 120)), MUSCLE_HU, "solid")  # psoas
        put(
            paint.ellipsoid((side * 68.0 * size, -42.0, rng.uniform(150, 185)), (28, 22, 52), _rotation(0, side * 15)),
            rng.uniform(28.0, 40.0),
            "solid",
        )
    liver_c = np.array([RIGHT * 62.0 * size, 12.0, rng.uniform(215.0, 250.0)])  # the liver is on the right
    put(paint.ellipsoid(liver_c, np.array([85.0, 78.0, 72.0]) * size), rng.uniform(50.0, 72.0), "solid")
    for _ in range(int(rng.integers(4, 9))):
        p0 = np.array([LEFT * rng.uniform(-80, 80), rng.uniform(-15, 60), rng.uniform(125, 230)])
        p1 = p0 + rng.uniform(-45, 45, 3) * [LEFT, 1.0, 1.0]
        r = rng.uniform(10.0, 17.0)
        put(paint.capsule(p0, p1, r)[:2], MUSCLE_HU - 5.0, "bowel")
        put(paint.capsule(p0, p1, r - 3.0)[:2], GAS_HU if rng.random() < 0.5 else rng.uniform(0.0, 25.0))


def save_nifti(phantom: Phantom, image_path: str, label_path: str | None = None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(phantom.image, phantom.affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"SYNTHETIC pelvic phantom - not patient data"
    nib.save(img, image_path)
    if label_path is not None:
        lab = nib.Nifti1Image(phantom.label, phantom.affine)
        lab.header.set_xyzt_units("mm")
        nib.save(lab, label_path)


def make_water_phantom(
    shape: tuple[int, int, int] = SMALL_SHAPE, spacing: tuple[float, float, float] = SMALL_SPACING
) -> Phantom:
    """A CT of a cylindrical water QA phantom (the daily-QA scan of a CT simulator): no patient, no CTV.

    Water cylinder of 300 mm diameter along z with a bone-equivalent and a lung-equivalent rod
    and 12 HU noise. Active-learning tests use it as a clearly out-of-distribution CT.
    """
    grid = _Grid(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), 0.0)
    x, y = grid.axes[0][:, None], grid.axes[1][None, :]
    r2 = x**2 + y**2
    plane = np.full(r2.shape, AIR_HU, dtype=np.float32)
    plane[r2 <= 150.0**2] = 0.0
    plane[(x - 70.0) ** 2 + y**2 <= 20.0**2] = 800.0
    plane[(x + 70.0) ** 2 + y**2 <= 20.0**2] = -700.0
    image = np.repeat(plane[:, :, None], grid.shape[2], axis=2)
    image += np.random.default_rng(0).normal(0.0, 12.0, image.shape).astype(np.float32)
    return Phantom(
        image=np.clip(image, -1024, 3071).astype(np.int16),
        label=np.zeros(grid.shape, dtype=np.uint8),
        affine=grid.affine,
        seed=-1,
    )
