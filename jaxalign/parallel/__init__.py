"""Meshes, logical-axis rules and shardings."""

from jaxalign.parallel.mesh import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    batch_sharding,
    batch_shardings,
    check_batch_divisible,
    logical_to_spec,
    make_mesh,
    param_shardings,
    param_specs,
    reference_rules,
    reference_shardings,
    replicated,
)
