"""Checks of a local image folder's layout (`dir/<class>/` or `dir/<split>/<class>/`) before the `imagefolder`
loader reads it: that loader drops an empty class, the labels of a single one, or all labels when images lie at two
depths, without a word."""

import os

SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val", "dev", "eval", "evaluation", "training", "testing")


def _visible(entries) -> list:
    return [e for e in entries if not e.name.startswith((".", "__"))]  # as the loader: no .DS_Store, __MACOSX


def _files_in(folder: str) -> list[str]:
    """The images the `imagefolder` loader would read in `folder` (by extension; other files it skips)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return [e.name for e in _visible(os.scandir(folder))
            if e.is_file() and os.path.splitext(e.name)[1].lower() in ImageFolder.EXTENSIONS]


def check_image_folder(directory: str) -> None:
    """An image folder labelled by its class subfolders (`dir/<class>/` or `dir/<split>/<class>/`) has two classes
    or more, none of them empty, and its images at one depth (the `imagefolder` loader would drop an empty class,
    or the labels of a single one or of all, without a word). Other layouts, and folders labelled by a metadata
    file, are left to the loader."""
    if any(f.startswith("metadata.") for _, _, files in os.walk(directory) for f in files):
        return
    subfolders = sorted(e.path for e in _visible(os.scandir(directory)) if e.is_dir())
    splits = [f for f in subfolders if os.path.basename(f).lower() in SPLIT_FOLDERS]
    if splits and len(splits) != len(subfolders):
        return  # split folders beside other folders: not a layout this check knows
    for split in splits or [directory]:
        if linked := sorted(e.path for e in _visible(os.scandir(split)) if e.is_dir() and e.is_symlink()):
            raise ValueError(f"Class folder(s) {linked[:3]} are symbolic links to folders, which the loader does not "
                             "follow: their class would be dropped without a word. Copy the folder in, or link its "
                             "image files one by one.")
        classes = sorted(e.path for e in _visible(os.scandir(split)) if e.is_dir())
        if classes and all(not _files_in(c) and any(e.is_dir() for e in _visible(os.scandir(c))) for c in classes):
            return  # deeper nesting (e.g. dir/images/<class>/): left to the loader
        # images at two depths leave the loader without labels ("no label column"): name what to move
        stray = _files_in(split) if classes else []
        nested = [os.path.join(c, e.name) for c in classes for e in _visible(os.scandir(c))
                  if e.is_dir() and _files_in(os.path.join(c, e.name))]
        if stray or nested:
            where = f"image file(s) {stray[:3]} directly in {split!r}, beside its class subfolders" if stray else \
                f"subfolder(s) {nested[:3]} of images inside class folders"
            raise ValueError(f"{where}: an image folder holds its images one level down, in one subfolder per "
                             "class, so the loader finds no labels. Move them into their class folder, or remove "
                             "them.")
        empty = [c for c in classes if not _files_in(c)]
        if empty:
            raise ValueError(f"Class folder(s) {empty} hold no images (none with an image extension the loader "
                             "reads): add images or remove the folder.")
        if len(classes) < 2:
            names = [os.path.basename(c) for c in classes]
            raise ValueError(f"{split!r} has {len(classes)} class subfolder(s) {names}; a classifier needs two "
                             "classes or more, one subfolder of images per class.")
