"""spatial-entropy: a spatial-entropy regulariser for Vision Transformers, on top of timm."""

__version__ = "0.1.0"

from spatial_entropy.attention import AttentionCapture, unwrap_model
from spatial_entropy.components import label_components, reference_label_components
from spatial_entropy.config import TrainConfig, load_config
from spatial_entropy.data import (
    DatasetError,
    build_dataset,
    dataset_names,
    generate_cluttered,
    stratified_subset,
)
from spatial_entropy.drloc import drloc_loss
from spatial_entropy.engine import train
from spatial_entropy.entropy import (
    SpatialEntropyLoss,
    reference_spatial_entropy,
    se_weight,
    spatial_entropy,
)
from spatial_entropy.evaluation import (
    AttentionStatistics,
    attention_jaccard,
    attention_masks,
    evaluate,
    evaluate_attention,
    evaluate_run,
    map_statistics,
)
from spatial_entropy.models import create_model, load_checkpoint_into, remove_last_skip
from spatial_entropy.regularizers import (
    DRLocRegularizer,
    Regularizer,
    SpatialEntropyRegularizer,
)
