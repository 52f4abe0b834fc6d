"""Export a trained run to ONNX, with its preprocessing beside it, checked against onnxruntime.

    python export.py runs/exp --onnx                 # -> runs/exp/export/model.onnx + preprocessing.json
    python export.py runs/kf --onnx --output_dir deploy   # a k-fold run: one model per fold

The model is exported in fp32 with a softmax on its output (probabilities, like inference.py's)
and a dynamic batch size. preprocessing.json says what an image needs before it: resized with
antialiased interpolation to `prepared_size` (then to `input_size`), RGB scaled to 0..1, normalized
with `mean` / `std`, NCHW, cropped to the face first when `facecrop` is on (MTCNN box grown by
`face_margin`), and the class names in output order. The export is then run with onnxruntime
on real images (the run's validation images, or --data_dir) prepared exactly as inference.py
prepares them, and the largest difference from PyTorch's probabilities is reported (under 1e-4
expected in fp32).

onnx and onnxruntime are optional: `pip install onnx onnxruntime` (one line says so when missing).
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os
import warnings

import numpy as np
import torch

from augmentation import eval_transform
from dataset import read_csv_columns, read_eval_dir
from facecrop import FACE_MARGIN, face_regions
from maskcls import cli
from maskcls.atomic import check_outputs, replacing, write_json
from maskcls.images import ImageDataset, make_loader
from maskcls.predict import run_prepared_size
from maskcls.readers import member_dirs, read_config
from validate import load_model

PARITY_TOLERANCE = 1e-4  # fp32 ONNX against PyTorch, in probability
CHECK_IMAGES = 32


def get_args_parser():
    parser = cli.ArgumentParser(description="Export a run's model (ONNX) with its preprocessing, checked against "
                                            "onnxruntime on real images.",
                                epilog="Every flag also has a kebab-case spelling (--output-dir).")
    parser.add_argument("run", metavar="RUN", help="a run folder (a k-fold parent: one model per fold)")
    cli.bool_flag(parser, "--onnx", help="write model.onnx (the one format so far; required)")
    parser.add_argument("--checkpoint", default="best.pth", help="which checkpoint of the run")
    parser.add_argument("--output_dir", default=None, metavar="DIR", help="where to write (default: RUN/export)")
    parser.add_argument("--opset", type=cli.number(int, 13, 23), default=17, help="the ONNX opset")
    parser.add_argument("--data_dir", default=None,
                        help="images for the onnxruntime check (default: the run's validation images)")
    parser.add_argument("--check_images", type=cli.positive_int, default=CHECK_IMAGES, help="images checked")
    cli.bool_flag(parser, "--overwrite", help="replace an earlier export")
    return parser


def require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise cli.UserError("export.py --onnx needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    return onnx, onnxruntime


class Probabilities(torch.nn.Module):
    """The run's model with a softmax: what inference.py averages and saves."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image).float().softmax(1)


def preprocessing(config, file_name):
    facecrop = bool(config.get("facecrop"))
    return {"model_file": file_name, "input_name": "image", "output_name": "probabilities", "layout": "NCHW",
            "dtype": "float32", "input_size": list(config["input_size"]),
            "prepared_size": list(run_prepared_size(config)),
            "resize": "to prepared_size: antialiased bilinear (PIL's Image.BILINEAR, torchvision's Resize; within 1 "
            "of it) where it shrinks, bicubic (cv2.INTER_CUBIC) where it enlarges (the shrinking first where one "
            "side shrinks, the other grows); then bilinear to input_size where they differ",
            "scale": "RGB / 255", "mean": list(config["mean"]),
            "std": list(config["std"]), "facecrop": facecrop,
            "face_margin": config.get("face_margin", FACE_MARGIN) if facecrop else None,
            "classes": list(config["classes"])}


def check_images(run_dir, config, data_dir, count):
    """(root, paths) of real images to check the export on: the run's validation side, or a folder."""
    if data_dir:
        if os.path.isfile(os.path.join(data_dir, "info.csv")) or not os.path.isdir(os.path.join(data_dir, "images")):
            return os.path.normpath(data_dir), read_eval_dir(data_dir).paths[:count]
        from dataset import DATASETS, resolve_train_dir
        source = DATASETS.build(config["dataset"], resolve_train_dir(data_dir))
        return source.root, source.all_paths()[:count]
    split = read_csv_columns(os.path.join(run_dir, "split.csv"), ("path", "side"))
    side = split[split["side"] == "val"]
    if side.empty:
        side = split  # --val_ratio 0: its training images are real images too
    from dataset import resolve_train_dir
    root = resolve_train_dir(config["data_dir"])
    return root, [os.path.join(root, p) for p in side["path"].tolist()[:count]]


def export_one(run_dir, args, out, onnx, ort, name):
    config = read_config(run_dir)
    model = Probabilities(load_model(run_dir, config, args.checkpoint, False, torch.device("cpu"))).eval()
    root, paths = check_images(run_dir, config, args.data_dir, args.check_images)
    regions = face_regions(paths, root, config.get("face_margin", FACE_MARGIN)) if config.get("facecrop") else None
    dataset = ImageDataset(paths, [-1] * len(paths), eval_transform(tuple(config["input_size"]), config["mean"],
                                                                      config["std"]),
                           prepare_to=run_prepared_size(config), regions=regions)
    images = next(iter(make_loader(dataset, len(paths), 0, "cpu")))[0]
    path = os.path.join(out, f"{name}.onnx")
    with replacing(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation note; it needs no onnxscript
        torch.onnx.export(model, (images[:1],), tmp, dynamo=False, opset_version=args.opset,
                          input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
        onnx.checker.check_model(tmp)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images).numpy()
    got = session.run(None, {"image": images.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    same = int((got.argmax(1) == expected.argmax(1)).sum())
    return path, preprocessing(config, os.path.basename(path)), difference, same, len(paths)


def main(args):
    if not args.onnx:
        raise cli.UserError("say which format: --onnx (the one export so far)")
    onnx, ort = require_onnx()
    config = read_config(args.run)
    members = member_dirs(config, os.path.join(args.run, "config.json"))
    runs = [(os.path.join(args.run, m), m) for m in members] or [(args.run, "model")]
    out = args.output_dir or os.path.join(args.run, "export")
    outputs = [os.path.join(out, f"{name}.onnx") for _, name in runs] + [os.path.join(out, "preprocessing.json")]
    check_outputs(outputs, overwrite=args.overwrite)
    os.makedirs(out, exist_ok=True)
    manifest, worst = [], 0.0
    for run_dir, name in runs:
        path, recipe, difference, same, count = export_one(run_dir, args, out, onnx, ort, name)
        manifest.append(recipe)
        worst = max(worst, difference)
        print(f"{path}: onnxruntime against PyTorch on {count} real images: max |difference| of probabilities "
              f"{difference:.2e}, the same class for {same} of {count}")
    write_json(outputs[-1], manifest[0] if len(manifest) == 1 else {"models": manifest, "combine": "mean"})
    verdict = "within" if worst < PARITY_TOLERANCE else "OVER"
    print(f"wrote {outputs[-1]} (the preprocessing); parity {verdict} {PARITY_TOLERANCE:g}")
    return worst


if __name__ == "__main__":
    cli.run(main, get_args_parser)
