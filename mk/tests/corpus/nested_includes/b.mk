VB=b
tb:V:
	echo tb
