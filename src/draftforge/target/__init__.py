"""draftforge.target"""
