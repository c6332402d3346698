"""Write a small synthetic detection data set: coloured shapes of 3 classes on noise.

    python -m oddaemon.workers generate-demo --out DIR [--model effdet_d0|ssd_mobilenet_tiny]
                                             [--train-images N] [--eval-images N] [--seed S]

DIR gets::

    train-00000-of-00002.tfrecord, train-00001-of-00002.tfrecord   (JPEG images)
    eval.tfrecord                                                  (PNG images)
    label_map.pbtxt                                                (1 rectangle, 2 circle, 3 triangle)
    pipeline.config                                                (the chosen model, paths filled in)

Records are ``tf.train.Example`` with the keys the TF OD API decoder reads: ``image/encoded``,
``image/format``, ``image/height``, ``image/width``, ``image/filename``, ``image/source_id``,
``image/object/bbox/{xmin,xmax,ymin,ymax}`` (normalized), ``image/object/class/text`` and
``image/object/class/label``. Everything is deterministic for a given seed. Imports tensorflow
(to write the Examples), so it runs in a worker process, never in the daemon.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

CLASSES = ("rectangle", "circle", "triangle")  # label ids 1, 2, 3
COLOURS = {1: (225, 45, 45), 2: (40, 205, 60), 3: (50, 90, 235)}
TRAIN_SHARDS = 2

MODELS = {
    # name: (image side, batch size, default num_steps)
    "ssd_mobilenet_tiny": (160, 4, 40),  # the tests' model: seconds per job
    "ssd_demo": (128, 8, 500),  # the demo's: the same SSD at 128x128, learns the shapes in ~500 steps on a CPU
    "effdet_d0": (256, 4, 200),
}

_COMMON_SSD = """\
    box_coder {{
      faster_rcnn_box_coder {{
        y_scale: 10.0
        x_scale: 10.0
        height_scale: 5.0
        width_scale: 5.0
      }}
    }}
    matcher {{
      argmax_matcher {{
        matched_threshold: 0.5
        unmatched_threshold: 0.5
        ignore_thresholds: false
        negatives_lower_than_unmatched: true
        force_match_for_each_row: true
        use_matmul_gather: true
      }}
    }}
    similarity_calculator {{
      iou_similarity {{
      }}
    }}
    encode_background_as_zeros: true
    anchor_generator {{
      multiscale_anchor_generator {{
        min_level: 3
        max_level: {max_level}
        anchor_scale: 4.0
        aspect_ratios: [1.0, 2.0, 0.5]
        scales_per_octave: 2
      }}
    }}
"""

_LOSS_AND_POST = """\
    loss {{
      classification_loss {{
        weighted_sigmoid_focal {{
          alpha: 0.25
          gamma: 1.5
        }}
      }}
      localization_loss {{
        weighted_smooth_l1 {{
        }}
      }}
      classification_weight: 1.0
      localization_weight: 1.0
    }}
    normalize_loss_by_num_matches: true
    normalize_loc_loss_by_codesize: true
    post_processing {{
      batch_non_max_suppression {{
        score_threshold: 1e-8
        iou_threshold: 0.5
        max_detections_per_class: 20
        max_total_detections: 20
      }}
      score_converter: SIGMOID
    }}
  }}
}}
"""

_HYPERPARAMS = """\
        activation: {activation}
        regularizer {{
          l2_regularizer {{
            weight: 0.00004
          }}
        }}
        initializer {{
          random_normal_initializer {{
            stddev: 0.01
            mean: 0.0
          }}
        }}
        batch_norm {{
          scale: true
          decay: 0.99
          epsilon: 0.001
        }}
"""

_TRAIN_EVAL = """\
train_config {{
  batch_size: {batch_size}
  num_steps: {num_steps}
  data_augmentation_options {{
    random_horizontal_flip {{
    }}
  }}
  optimizer {{
    momentum_optimizer {{
      learning_rate {{
        cosine_decay_learning_rate {{
          learning_rate_base: {learning_rate_base}
          total_steps: {num_steps}
          warmup_learning_rate: {warmup_learning_rate}
          warmup_steps: {warmup_steps}
        }}
      }}
      momentum_optimizer_value: 0.9
    }}
    use_moving_average: false
  }}
  max_number_of_boxes: 10
  unpad_groundtruth_tensors: false
}}
train_input_reader {{
  label_map_path: "{label_map}"
  tf_record_input_reader {{
    input_path: "{train_glob}"
  }}
}}
eval_config {{
  metrics_set: "coco_detection_metrics"
  use_moving_averages: false
  batch_size: 1
  num_visualizations: 2
  max_num_boxes_to_visualize: 10
}}
eval_input_reader {{
  label_map_path: "{label_map}"
  shuffle: false
  num_epochs: 1
  tf_record_input_reader {{
    input_path: "{eval_path}"
  }}
}}
"""


def pipeline_text(model: str, data_dir: str, num_steps: int | None = None) -> str:
    """The pipeline.config text of the project's own small model, with data_dir's paths filled in."""
    size, batch_size, default_steps = MODELS[model]
    steps = num_steps or default_steps
    paths = {"label_map": os.path.join(data_dir, "label_map.pbtxt"),
             "train_glob": os.path.join(data_dir, "train-?????-of-?????.tfrecord"),
             "eval_path": os.path.join(data_dir, "eval.tfrecord")}
    rate = 0.08 if model == "ssd_demo" else 0.04
    train_eval = _TRAIN_EVAL.format(batch_size=batch_size, num_steps=steps, warmup_steps=max(1, steps // 10),
                                    learning_rate_base=rate, warmup_learning_rate=rate / 10, **paths)
    if model == "effdet_d0":
        header = (f"# EfficientDet-D0 (ssd_efficientnet-b0_bifpn_keras) at {size}x{size}, trained from scratch on\n"
                  "# oddaemon's synthetic demo data (generated by oddaemon.workers.demo_data).\n")
        body = f"""\
model {{
  ssd {{
    inplace_batchnorm_update: true
    freeze_batchnorm: false
    num_classes: {len(CLASSES)}
    add_background_class: false
{_COMMON_SSD.format(max_level=7)}\
    image_resizer {{
      keep_aspect_ratio_resizer {{
        min_dimension: {size}
        max_dimension: {size}
        pad_to_max_dimension: true
      }}
    }}
    box_predictor {{
      weight_shared_convolutional_box_predictor {{
        depth: 64
        class_prediction_bias_init: -4.6
        conv_hyperparams {{
          force_use_bias: true
{_HYPERPARAMS.format(activation="SWISH")}\
        }}
        num_layers_before_predictor: 3
        kernel_size: 3
        use_depthwise: true
      }}
    }}
    feature_extractor {{
      type: "ssd_efficientnet-b0_bifpn_keras"
      bifpn {{
        min_level: 3
        max_level: 7
        num_iterations: 3
        num_filters: 64
      }}
      conv_hyperparams {{
        force_use_bias: true
{_HYPERPARAMS.format(activation="SWISH")}\
      }}
    }}
{_LOSS_AND_POST.format()}"""
    else:
        header = (f"# A tiny SSD MobileNetV2-FPN (depth multiplier 0.35) at {size}x{size}, trained from scratch on\n"
                  "# oddaemon's synthetic demo data (generated by oddaemon.workers.demo_data). Fast on a CPU.\n")
        body = f"""\
model {{
  ssd {{
    inplace_batchnorm_update: true
    freeze_batchnorm: false
    num_classes: {len(CLASSES)}
{_COMMON_SSD.format(max_level=5)}\
    image_resizer {{
      fixed_shape_resizer {{
        height: {size}
        width: {size}
      }}
    }}
    box_predictor {{
      weight_shared_convolutional_box_predictor {{
        depth: 32
        class_prediction_bias_init: -4.6
        conv_hyperparams {{
{_HYPERPARAMS.format(activation="RELU_6")}\
        }}
        num_layers_before_predictor: 1
        share_prediction_tower: true
        use_depthwise: true
        kernel_size: 3
      }}
    }}
    feature_extractor {{
      type: "ssd_mobilenet_v2_fpn_keras"
      use_depthwise: true
      fpn {{
        min_level: 3
        max_level: 5
        additional_layer_depth: 32
      }}
      min_depth: 8
      depth_multiplier: 0.35
      conv_hyperparams {{
{_HYPERPARAMS.format(activation="RELU_6")}\
      }}
      override_base_feature_extractor_hyperparams: true
    }}
{_LOSS_AND_POST.format()}"""
    return header + body + train_eval


def label_map_text() -> str:
    return "".join(f"item {{\n  id: {i}\n  name: \"{name}\"\n}}\n" for i, name in enumerate(CLASSES, start=1))


def _overlaps(box, boxes, limit=0.3) -> bool:
    y0, x0, y1, x1 = box
    for b0, a0, b1, a1 in boxes:
        inter = max(0, min(y1, b1) - max(y0, b0)) * max(0, min(x1, a1) - max(x0, a0))
        smaller = min((y1 - y0) * (x1 - x0), (b1 - b0) * (a1 - a0))
        if inter > limit * smaller:
            return True
    return False


def make_image(rng, size: int):
    """(HxWx3 uint8 image, [(ymin, xmin, ymax, xmax) normalized], [label id]) with 1 to 3 shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    noise = rng.integers(40, 140, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            side_h = int(rng.integers(size // 5, int(size * 0.45)))
            side_w = int(rng.integers(size // 5, int(size * 0.45)))
            top = int(rng.integers(0, size - side_h))
            left = int(rng.integers(0, size - side_w))
            box = (top, left, top + side_h, left + side_w)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        label = int(rng.integers(1, len(CLASSES) + 1))
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[label]) + rng.integers(-25, 26, 3), 0, 255))
        top, left, bottom, right = box
        xy = (left, top, right - 1, bottom - 1)
        if label == 1:
            draw.rectangle(xy, fill=colour)
        elif label == 2:
            draw.ellipse(xy, fill=colour)
        else:
            draw.polygon([(left + side_w // 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=colour)
        boxes.append(box)
        labels.append(label)
    normalized = [(y0 / size, x0 / size, y1 / size, x1 / size) for y0, x0, y1, x1 in boxes]
    return np.asarray(image), normalized, labels


def encode(image, fmt: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    options = {"format": "JPEG", "quality": 92} if fmt == "jpeg" else {"format": "PNG"}
    Image.fromarray(image).save(out, **options)
    return out.getvalue()


def make_example(image, boxes, labels, filename: str, fmt: str):
    import tensorflow as tf

    def _bytes(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    def _floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    def _ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    height, width = image.shape[:2]
    feature = {
        "image/encoded": _bytes([encode(image, fmt)]),
        "image/format": _bytes([fmt.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/filename": _bytes([filename.encode()]),
        "image/source_id": _bytes([filename.encode()]),
        "image/object/bbox/ymin": _floats([b[0] for b in boxes]),
        "image/object/bbox/xmin": _floats([b[1] for b in boxes]),
        "image/object/bbox/ymax": _floats([b[2] for b in boxes]),
        "image/object/bbox/xmax": _floats([b[3] for b in boxes]),
        "image/object/class/text": _bytes([CLASSES[label - 1].encode() for label in labels]),
        "image/object/class/label": _ints(labels),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _write_records(path: str, examples) -> None:
    import tensorflow as tf

    temp = f"{path}.tmp{os.getpid()}"
    with tf.io.TFRecordWriter(temp) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    os.replace(temp, path)


def _write_text(path: str, text: str) -> None:
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)


def generate(out: str, model: str = "ssd_mobilenet_tiny", train_images: int = 24, eval_images: int = 8,
             seed: int = 0, num_steps: int | None = None) -> dict:
    """Write the data set into ``out``; returns the paths written."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    import numpy as np

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    size = MODELS[model][0]
    rng = np.random.default_rng(seed)
    train = []
    for index in range(train_images):
        image, boxes, labels = make_image(rng, size)
        train.append(make_example(image, boxes, labels, f"train_{index:05d}.jpg", "jpeg"))
    shards = []
    for shard in range(TRAIN_SHARDS):
        path = os.path.join(out, f"train-{shard:05d}-of-{TRAIN_SHARDS:05d}.tfrecord")
        _write_records(path, train[shard::TRAIN_SHARDS])
        shards.append(path)
    evaluation = []
    for index in range(eval_images):
        image, boxes, labels = make_image(rng, size)
        evaluation.append(make_example(image, boxes, labels, f"eval_{index:05d}.png", "png"))
    eval_path = os.path.join(out, "eval.tfrecord")
    _write_records(eval_path, evaluation)
    label_map = os.path.join(out, "label_map.pbtxt")
    _write_text(label_map, label_map_text())
    pipeline = os.path.join(out, "pipeline.config")
    _write_text(pipeline, pipeline_text(model, out, num_steps))
    return {"train": shards, "eval": [eval_path], "label_map": label_map, "pipeline_config": pipeline}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m oddaemon.workers generate-demo")
    parser.add_argument("--out", required=True, help="directory to write the data set into")
    parser.add_argument("--model", choices=sorted(MODELS), default="ssd_mobilenet_tiny")
    parser.add_argument("--train-images", type=int, default=24)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=None, help="train_config.num_steps (and total_steps)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.train_images < 1 or args.eval_images < 1:
        print("generate-demo: --train-images and --eval-images must be at least 1", file=sys.stderr)
        return 2
    written = generate(args.out, args.model, args.train_images, args.eval_images, args.seed, args.num_steps)
    for kind, value in written.items():
        for path in value if isinstance(value, list) else [value]:
            print(f"{kind}: {path}")
    return 0
