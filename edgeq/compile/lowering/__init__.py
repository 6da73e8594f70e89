"""The integer lowering's rules, one module per family of ops; importing the package registers each rule in
:data:`edgeq.compile.lowering.rule.LOWERING` against the ops it lowers (:mod:`edgeq.compile.lower_integer` runs
them).

- :mod:`.rule`: what a rule is, and the table;
- :mod:`.qdq`: the quantization of a unit, read from its quantize / dequantize calls;
- :mod:`.weighted`: conv2d, linear;
- :mod:`.arithmetic`: add, the average pools, concat;
- :mod:`.products`: mul, matmul;
- :mod:`.movement`: data movement, split, clamps;
- :mod:`.bilinear`: the bilinear resize;
- :mod:`.lookup_table`: the table activations, one form each.
"""

from edgeq.compile.lowering import arithmetic, bilinear, lookup_table, movement, products, weighted  # noqa: F401 (they register)
