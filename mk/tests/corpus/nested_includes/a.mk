VA=a
<b.mk
ta:V:
	echo ta $VB
