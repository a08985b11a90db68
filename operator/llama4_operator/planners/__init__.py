"""Pure planners: plain data in, plain data out, no I/O."""
