"""Frozen-tower feature caches: the trunks' outputs per sample, stored next to the shards (safetensors).

With ``model.trainable: heads`` the towers' trunks are fixed functions, so each sample is encoded
once (:func:`build_feature_cache`, ``mmsphere cache``) and training, validation and evaluation run
the heads on the stored features (``data.feature_cache: true``). Format and reader: :mod:`mmsphere.data.feature_files`, :mod:`mmsphere.data.cached`.
"""

from mmsphere.cache.build import (BuildReport, build_config_caches, build_feature_cache, cache_for, check_cacheable,
                                  config_caches, trunk_digest)
from mmsphere.data.cached import CachedRaw, CachedSample, cached_reader
from mmsphere.data.feature_files import FeatureCache, ShardFeatures, read_shard_features

__all__ = ["BuildReport", "CachedRaw", "CachedSample", "FeatureCache", "ShardFeatures", "build_config_caches", "build_feature_cache",
           "cache_for", "cached_reader", "check_cacheable", "config_caches", "read_shard_features", "trunk_digest"]
