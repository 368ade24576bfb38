X=from-inc
x:V:
	echo x
