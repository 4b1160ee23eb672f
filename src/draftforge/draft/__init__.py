"""draftforge.draft"""
