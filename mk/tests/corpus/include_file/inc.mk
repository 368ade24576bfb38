B=included
fromInclude:V:
	echo in include $B
