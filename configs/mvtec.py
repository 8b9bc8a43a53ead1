"""Full RSTPM on MVTec AD with the paper's defaults (section 4.1)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = "train"  # "train" (train then evaluate) or "eval" (evaluate saved checkpoints)
  config.name = "rstpm"  # model name in reports and sweeps

  config.data = ml_collections.ConfigDict()
  config.data.root = "~/data/mvtec_anomaly_detection"  # ROOT/<category>/train/good/...
  config.data.categories = "all"  # comma-separated names, or "all" (every category under root)
  config.data.image_size = 256
  config.data.generate_synthetic = False  # write the synthetic demo dataset to root if absent
  config.data.holdout_fraction = 0.1  # of train/good, held out to set thresholds
  # Training order: a full permutation per epoch drawn from (seed, epoch), so resume is exact.

  config.model = ml_collections.ConfigDict()
  config.model.teacher1 = "resnet18"
  config.model.teacher2 = "resnet50"
  config.model.student1 = True
  config.model.student2 = True
  config.model.attention = True
  config.model.attention_mode = "mul"  # "mul": s * a, "residual": s + s * a
  config.model.decoder_widths = (256, 128, 64)
  config.model.dtype = "float32"  # or "bfloat16" (compute; parameters stay float32)
  config.model.random_teachers = False  # True: random teachers (demo/tests only)
  config.model.teacher1_weights = "weights/resnet18.msgpack"
  config.model.teacher2_weights = "weights/resnet50.msgpack"

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "paper"

  config.maps = ml_collections.ConfigDict()
  config.maps.fusion = "multiply"  # across resolutions; same-resolution maps are added
  config.maps.smoothing_sigma = 0.0  # Gaussian sigma in pixels; 0 = off

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 100
  config.train.batch_size = 32  # global, over all devices and hosts
  config.train.learning_rate = 0.4
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.checkpoint_every_epochs = 10
  config.train.keep_checkpoints = 2
  config.train.log_every_steps = 10
  config.train.cache_teacher_features = "auto"  # "auto" (when it fits), "on", "off"
  config.train.cache_max_bytes = 8 * 2**30

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32
  config.eval.pro_max_fpr = 0.3
  config.eval.figures = True
  config.eval.threshold_percentile = 99.0

  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; empty: auto / single host
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  return config
