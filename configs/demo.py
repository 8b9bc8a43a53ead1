"""The embedded demo: synthetic MVTec-layout data, random teachers, small and fast on a CPU."""

from configs import mvtec


def get_config():
    config = mvtec.get_config()
    config.name = "rstpm_demo"
    config.data.root = "synthetic"  # relative: inside --workdir; generated if absent
    config.data.generate_synthetic = True
    config.data.categories = "all"
    config.data.image_size = 64
    config.model.random_teachers = True
    config.train.epochs = 8
    config.train.batch_size = 8
    config.train.learning_rate = 0.05
    config.train.checkpoint_every_epochs = 4
    config.train.log_every_steps = 5
    config.eval.batch_size = 16
    return config
