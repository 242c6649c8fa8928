"""Multi-job scheduler: grouping, packing, ordering, verification and a pipeline simulator.

Installed as lorafusion.scheduler; pure Python, independent of the kernels and the runtime.
"""
