"""Privacy: DP accounting, the SecAgg+ message contract, the device audit log and the report."""
