"""Images in: the pre-flight scan of the image files, the train/val/test splits with
`class_to_idx` from train (`build_splits`), the eval/train transforms for an augmentation strength,
loaders, the decoded-image cache (uint8 at the working size, one decode per study) and the split
record every worker reads back.
"""

from pipeline.data._diskcache import Usage, clear as clear_cache, summary as cache_summary, usage as cache_usage
from pipeline.data._imagecache import CachedImageList, MemoryBudget, budget, default_folder as cache_folder, shared
from pipeline.data._notices import notice
from pipeline.data._imagefiles import Findings, check_image, decode_image, ignored_files_message, ignored_kinds, list_images, load_rgb
from pipeline.data._splitrecord import SPLITS_ATTR, adopt, load_record, store_record, to_record
from pipeline.data._splits import ImageList, Sample, Splits, build_splits, loader, make_loader, scan_images
from pipeline.data._transforms import Preprocess, Transform, cached_eval_transform, cached_train_transform, eval_transform, train_transform

__all__ = ['CachedImageList', 'Usage', 'cache_folder', 'cache_summary', 'cache_usage', 'clear_cache', 'Findings', 'ImageList', 'MemoryBudget', 'Preprocess', 'SPLITS_ATTR', 'Sample', 'Splits', 'Transform', 'adopt', 'load_record', 'store_record', 'budget', 'build_splits', 'cached_eval_transform', 'cached_train_transform', 'check_image', 'decode_image', 'eval_transform', 'ignored_files_message', 'ignored_kinds', 'list_images', 'load_rgb', 'loader', 'make_loader', 'notice', 'scan_images', 'shared', 'to_record', 'train_transform']
