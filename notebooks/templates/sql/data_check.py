from lib.display import pruned_vs_whole_table, schema_check_table

display(pruned_vs_whole_table(eval_rows[0]))
schema_check_table({"training rows": train_rows, "held-out rows": eval_rows})
