"""Every config key with its default: the paper's setting (RSTPM on MVTec AD, section 4.1).

``configs/*.py`` start from :func:`get_config`; a workdir's saved ``config.json`` is merged
over it when loaded (``workdir.load_config``), so a workdir written before a key existed
still evaluates and predicts with that key's default.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.mode = "train"  # "train" (train then evaluate) or "eval" (evaluate saved checkpoints)
    config.name = "rstpm"  # model name in reports and sweeps
    # Modules imported before the run (comma-separated): where your own @register_loss,
    # @register_fusion and @register_distance functions live.
    config.plugins = ""

    config.data = ml_collections.ConfigDict()
    config.data.root = "~/data/mvtec_anomaly_detection"  # ROOT/<category>/train/good/...
    config.data.categories = "all"  # comma-separated names, or "all" (every category under root)
    config.data.image_size = 256
    config.data.generate_synthetic = False  # write the synthetic demo dataset to root if absent
    config.data.holdout_fraction = 0.1  # of train/good, held out to set thresholds
    # Prepared TFDS data (rstpm_jax.data.tfds_mvtec) to train and evaluate from: built from
    # data.root once if absent. Empty: read the image files under data.root directly.
    config.data.tfds_dir = ""
    # Tiling for large images (rstpm_jax.data.tiling): with tile_size > 0 (a multiple of 32) the
    # images keep their own resolution (image_size is not used) and the model trains and
    # evaluates on tile_size x tile_size tiles every tile_stride pixels (0: tile_size, no
    # overlap); test maps are stitched back, overlaps averaged. 0 = off.
    config.data.tile_size = 0
    config.data.tile_stride = 0
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
    # On a CPU backend, layers with faster gradients on XLA:CPU (rstpm_jax.ops.layers; same
    # variables and numbers). No effect on GPU/TPU.
    config.model.fast_cpu_ops = True

    config.loss = ml_collections.ConfigDict()
    # A registered loss (rstpm_jax.losses): "stpm" is the official STPM code's (2 x eq. 4, what
    # lr 0.4 was tuned with), "paper" eq. 4 as written, "anomalib_stfpm" anomalib's.
    config.loss.name = "stpm"
    config.loss.kwargs = ml_collections.ConfigDict()  # keyword arguments of the loss

    config.maps = ml_collections.ConfigDict()
    config.maps.distance = "squared_l2"  # per-position distance (eq. 2); the losses follow it
    config.maps.distance_kwargs = ml_collections.ConfigDict()
    config.maps.fusion = "multiply"  # fusion rule over students and resolutions
    config.maps.kwargs = ml_collections.ConfigDict()  # keyword arguments of the fusion rule
    config.maps.smoothing_sigma = 0.0  # Gaussian sigma in pixels; 0 = off

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 100
    config.train.batch_size = 32  # per job (model), split over its mesh.data devices
    # Train the last partial batch of an epoch (padded, the padding masked out) as the
    # reference code does; True drops it.
    config.train.drop_last = False
    # Which epoch's students are kept: "best_holdout" (the reference code's: the lowest mean
    # final map over the held-out normal images, checked every select_every_epochs) or "last".
    config.train.select_epoch = "best_holdout"
    config.train.select_every_epochs = 1
    config.train.seeds = ""  # e.g. "0,1,2": one model per category and seed (default: config.seed)
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
    # Evaluate through an exported artifact (rstpm_jax.deploy): "jax" (in process, no artifact),
    # "onnxruntime" or "openvino"; precision "f32", "bf16" (jax: model.dtype bfloat16; openvino:
    # its bf16 hint) or "int8" (openvino: NNCF int8 convolutions calibrated on normal images,
    # eval.int8_calibration). Anything but jax/f32 writes to <category>/eval_<backend>_<precision>/.
    config.eval.backend = "jax"
    config.eval.precision = "f32"
    # int8 exports (eval, export, predict): > 0 runs NNCF's accuracy control, reverting to float32
    # the convolutions that move the held-out maps most until their agreement with the float32
    # maps drops by at most this (quantize.map_agreement); 0: plain quantisation (much faster).
    config.eval.int8_max_drop = 0.0
    # The normal images int8 calibrates on: "holdout" (the held-out split of train/good) or
    # "train" (all of train/good; on the demo data it moved no AUROC closer to float32).
    config.eval.int8_calibration = "holdout"
    # int8 activation ranges are the calibration's times this (quantize.widen_activation_ranges):
    # a defect's activations exceed the normal images' range; 1 keeps NNCF's ranges as measured.
    config.eval.int8_headroom = 2.0
    config.eval.artifact = ""  # an exported .onnx to evaluate; empty: export the trained model

    # The device mesh: jobs (category x seed) over "model", each job's batch over "data".
    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = "auto"  # devices along the job axis; "auto": min(jobs, devices / mesh.data)
    # Devices per job; "auto": 1 on one host; on several, all devices used with the fewest
    # padding jobs.
    config.mesh.data = "auto"
    # How a device runs its jobs: "vmap" (one batched program), "each" (one compiled job step
    # called for each job in turn: compiles once), "unroll" (one after another, written out in
    # one program: compile time grows with the jobs), "map" (a loop; on CPU a loop slows
    # convolutions ~15x); "auto": each on CPU (batched convolutions over stacked weights are
    # slower there), else vmap.
    config.mesh.stack = "auto"

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; empty: auto / single host
    config.distributed.num_processes = 0
    config.distributed.process_id = -1
    return config
