"""The names of what train.py writes in its workdir, for the loop and the tools."""

CONFIG_FILE = "config.json"  # the resolved config of the run
CLASS_NAMES_FILE = "class_names.json"  # the dataset's class names, when it has them
DATA_ORDER_FILE = "data_order.json"  # what fixes each step's batch (seed, batch, examples)
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"  # state checkpoints (Orbax)
BEST_DIR = "best"  # the parameters of the best evaluation so far
FINAL_DIR = "final"  # the finished run's weights, a pretrained directory
PROFILE_DIR = "profile"
