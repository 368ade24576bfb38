A=1
not a rule at all
